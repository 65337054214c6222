"""The one training loop of edlab, parameterised by ``TrainConfig``.

Each trick is a named step below: device-resident data with batched augmentation (data.py), bf16
autocast + channels_last where the hardware gains (AMX CPUs, CUDA), no weight decay on BN/bias, linear
warm-up, label smoothing, mixup, gradient clipping, distillation, non-finite-loss guard. The validation
split drives the scheduler (plateau), early stopping and best-epoch selection; the test split is
evaluated once, after training. Resume state is written atomically after every epoch, and all
randomness of an epoch derives from (seed, epoch), so a killed run continued with ``--resume`` ends
with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn

from . import distill
from .augment import crop_pool, mix
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .data import Data
from .device import autocast, resolve_channels_last, resolve_precision
from .distributed import Dist
from .errors import EdlabError
from .evaluation import evaluate, final_test
from .loader import load_checkpoint
from .models import create_model
from .optim import LRSchedule, build_optimizer, total_steps
from .options import TrainOptions, takes
from .resume import FitState, load_resume, save_resume
from .runs import Run
from .stage import StageRun, inference_record, run_model_stage
from .tricks import (
    EMA,
    Lookahead,
    dirac_init,
    first_conv,
    set_bn_momentum,
    set_whiten_bias_trainable,
    whiten_first_conv,
)
from .views import TTA_VIEWS


def fit(model: nn.Module, data: Data, cfg: TrainConfig, run: Run | None = None,
        teacher: nn.Module | None = None, resume: bool = False, console=None,
        on_epoch=None, d: Dist | None = None) -> FitState:
    """Train ``model`` in place for cfg.epochs on data.train, validating on data.val each epoch.

    Under torchrun (``d`` active) every rank runs this on its slice of each batch; rank 0 validates and
    writes, the others follow its decisions."""
    from . import distributed

    d = d or Dist()
    device = data.train.device
    if d.active and data.train.batch_size % d.world:
        raise EdlabError(f"batch size {data.train.batch_size} does not split into {d.world} equal rank slices")
    amp = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device, amp)
    if cfg.model.bn_momentum:  # step: BN running statistics that keep up with fast-moving weights
        set_bn_momentum(model, cfg.model.bn_momentum)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    data.train.channels_last = data.test.channels_last = channels_last
    if data.val is not None:
        data.val.channels_last = channels_last
    ddp = distributed.wrap(d, model, device, cfg.sync_bn)
    # step: compiled graph; mode reduce-overhead records CUDA graphs (no per-kernel launch cost)
    step_model = torch.compile(ddp, mode=cfg.compile_mode) if cfg.compile else ddp
    opt = build_optimizer(model, cfg.optim)
    sched = LRSchedule(cfg.sched, cfg.epochs, len(data.train), cfg.optim.lr)
    total = total_steps(cfg.epochs, len(data.train))
    # step: lookahead averaging (made after the device/memory-format moves: it holds the model's tensors)
    look = Lookahead(model, cfg.lookahead, cfg.lookahead_decay, total) if cfg.lookahead else None
    whitened = cfg.init.whiten and not first_conv(model).weight.requires_grad
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    state = FitState()
    if resume and run is not None:
        if run.file("resume.pt").exists():
            state = load_resume(run.file("resume.pt"), model, opt, sched, scaler, ema, math.ceil(cfg.epochs), look)
            if console is not None:
                console.print(f"resuming from epoch {state.epoch} of {cfg.epochs} ({run.file('resume.pt')})")
        if d.main:
            run.rewrite_metrics(state.history)  # the resume state is the truth: drop lines of unfinished epochs
    observer = _EPOCH_OBSERVER.get() if d.main else None
    where = str(run.path) if run is not None else None
    for row in state.history if observer is not None else []:  # restored epochs first (a resumed trial)
        observer(row, where)
    table, data.train.pool = None, None  # a pool left on a reused loader by an earlier fit does not carry over
    if teacher is not None:
        teacher.to(device).eval()
        # step: the teacher's logits once per image (and per mirror) when every epoch shows the same views
        # (augment none, or flips only: crop_pad 0; no cutout, no mixing), or once per pooled crop and mirror
        # (distill.crop_pool: each step then shows one of them); otherwise on the fly, on the student's
        # augmented (and mixed) batch
        views = distill.cached_views(data.train) if cfg.data.mixup == 0 and cfg.data.cutmix == 0 else 0
        pool = None
        if cfg.distill.crop_pool:  # the config refuses it beside anything but plain crop-flip
            pool = crop_pool(len(data.train.split), cfg.distill.crop_pool, data.train.augment.crop_pad,
                             data.train.seed).to(device)
            data.train.pool, views = pool, 2 * cfg.distill.crop_pool
        if views and state.epoch < math.ceil(cfg.epochs):
            path = run.file(distill.TABLE_FILE) if run is not None else None
            table, source = distill.saved_teacher_table(teacher, data.train, amp, views, path, write=d.main,
                                                        pool=pool, shared=distill.shared_table_dir())
            if console is not None:
                console.print(f"teacher logits: {len(table)} images x {views} view(s) "
                              + (f"read back from {source}" if source else "computed once"))
    # A non-finite loss is looked for on the host every step on CPU (free there) but every 50 steps on GPUs,
    # where each look is a host synchronisation; the first bad step is recorded on the device meanwhile.
    check_every = 1 if device.type == "cpu" or cfg.nan_policy == "skip" else 50

    for epoch in range(state.epoch, math.ceil(cfg.epochs)):
        t0 = time.perf_counter()
        model.train()
        if whitened:  # step: the whitening conv's bias trains for the first init.whiten_bias_epochs only
            set_whiten_bias_trainable(model, epoch, cfg.init.whiten_bias_epochs)
        data.train.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 7919 + epoch + 31)  # global RNG (stochastic binarization) from (seed, epoch)
        mix_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + epoch + 17)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # metrics stay on the device: no sync
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = torch.zeros((), device=device, dtype=torch.int64)
        first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        steps = min(len(data.train), total - epoch * len(data.train))  # the last of 9.9 epochs is partial
        for i, (x, y) in enumerate(_progress(data.train, epoch, cfg.epochs, console)):
            if i == steps:
                break
            lr = cfg.optim.lr * sched.factor(epoch * len(data.train) + i)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            t_out = distill.table_rows(table, data.train) if table is not None else None  # cached teacher rows
            if t_out is None:
                x, y = distributed.shard(d, x, y)  # step: this rank's slice of the global batch
            else:
                x, y, t_out = distributed.shard(d, x, y, t_out)
            # step: mixup / CutMix (one of them per batch when both are on)
            x, y, y_b, lam = mix(x, y, cfg.data.mixup, cfg.data.cutmix, cfg.data.mix_switch_prob, mix_gen)
            with autocast(device, amp):
                out = step_model(x)
                loss = ce(out.float(), y) if lam == 1.0 else \
                    lam * ce(out.float(), y) + (1 - lam) * ce(out.float(), y_b)
                if teacher is not None:  # step: distillation from the teacher's logits (cached or on the fly)
                    if t_out is None:
                        with torch.no_grad():
                            t_out = teacher(x)
                    loss = distill.distill_loss(out.float(), t_out.float(), loss, cfg.distill.temperature,
                                        cfg.distill.alpha)
            finite = torch.isfinite(loss.detach())  # step: non-finite guard
            first_bad = torch.where(finite | (first_bad >= 0), first_bad, i)
            if (i + 1) % check_every == 0 or i + 1 == steps:
                bad = (first_bad >= 0).to(torch.int64)
                distributed.all_sum(d, bad)  # every rank takes the same decision
                if int(bad):
                    if cfg.nan_policy == "stop":
                        at = int(first_bad) if int(first_bad) >= 0 else i
                        raise EdlabError(f"loss became non-finite (nan/inf) at epoch {epoch + 1} "
                                         f"step {at + 1}; stopped (the last good state is the previous epoch's "
                                         f"resume state). Lower the lr or set nan_policy=skip")
                    state.skipped_steps += 1
                    first_bad.fill_(-1)
                    opt.zero_grad(set_to_none=True)
                    continue
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if cfg.grad_clip:  # step: global gradient-norm clipping
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if ema is not None:  # step: weight averaging
                ema.update()
            if look is not None:  # step: lookahead (every N steps; the network is the average at the end)
                done = epoch * len(data.train) + i + 1
                look.step(done)
                if done == total:
                    look.finish()
            loss_sum += loss.detach().double() * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
        distributed.all_sum(d, loss_sum, correct, seen)
        seen = int(seen)
        train_seconds = time.perf_counter() - t0
        judged = ema.model if ema is not None else model  # the weights that validation (and the run) keep
        val = {"loss": None, "accuracy": None}
        if data.val is not None and d.main:
            val = evaluate(judged, data.val, amp, cfg.tta)
        val = distributed.broadcast(d, val)  # rank 0's figures drive every rank's schedule and early stop
        sched.epoch_end(val["loss"])
        seconds = time.perf_counter() - t0
        state.seconds += seconds
        row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, seen),
               "train_accuracy": float(correct) / max(1, seen), "val_loss": val["loss"],
               "val_accuracy": val["accuracy"], "lr": lr if steps else cfg.optim.lr, "seconds": seconds,
               "train_seconds": train_seconds, "images_per_s": seen / max(train_seconds, 1e-9)}
        state.history.append(row)
        improved = val["accuracy"] is not None and val["accuracy"] > state.best_val
        if improved:
            state.best_val, state.best_epoch, state.bad_epochs = val["accuracy"], epoch + 1, 0
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        if run is not None and d.main:
            if improved and cfg.keep == "best":
                save_checkpoint(judged, run.file("best.ckpt"), epoch=epoch + 1, val_accuracy=val["accuracy"])
            save_resume(run.file("resume.pt"), model, opt, sched, state, scaler, ema, look)
            run.log_metrics(row)
        if console is not None:
            console.print(_epoch_line(row, cfg.epochs))
        if on_epoch is not None:
            on_epoch(row)
        if observer is not None:  # a study's pruner may stop the run here (resume.pt is written)
            observer(row, where)
        if cfg.early_stop and state.bad_epochs >= cfg.early_stop:
            if console is not None:
                console.print(f"early stop: no val-accuracy gain for {cfg.early_stop} epochs")
            break
    if table is not None and run is not None and d.main:  # finished: no resume will need the table
        run.file(distill.TABLE_FILE).unlink(missing_ok=True)
    if ema is not None:  # the run's model is the averaged one
        model.load_state_dict(ema.model.state_dict())
    if cfg.sync_bn:
        distributed.unsync_bn(model)
    return state


# A study watching its trials' epochs (multi-fidelity search): every finished epoch of every fit in this
# context is shown to it as (row, run folder or None), the epochs a resumed fit restores first, so that an
# interrupted trial re-run from its resume.pt tells the pruner its whole curve again. It may raise to stop
# the fit: the epoch's resume state is already written, so the run can be continued later.
_EPOCH_OBSERVER: ContextVar[Callable[[dict, str | None], None] | None] = ContextVar("edlab_epoch_observer",
                                                                                    default=None)


@contextmanager
def observe_epochs(observer: Callable[[dict, str | None], None]):
    """Show ``observer(row, run_dir)`` every epoch that a ``fit`` inside the block finishes (or restores)."""
    token = _EPOCH_OBSERVER.set(observer)
    try:
        yield
    finally:
        _EPOCH_OBSERVER.reset(token)


def _epoch_line(r: dict, epochs: int) -> str:
    val = f" val {r['val_loss']:.3f}/{100 * r['val_accuracy']:.2f}%" if r["val_accuracy"] is not None else ""
    return (f"epoch {r['epoch']:>3}/{epochs}  train {r['train_loss']:.3f}/{100 * r['train_accuracy']:.2f}%"
            f"{val}  lr {r['lr']:.4g}  {r['seconds']:.1f}s  {r['images_per_s']:.0f} img/s")


def _progress(loader, epoch: int, epochs: int, console):
    if console is None or not console.is_terminal:
        yield from loader
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("epoch", f"{epoch + 1}/{epochs}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("train", total=len(loader))
        for item in loader:
            yield item
            bar.advance(task)


# ----------------------------------------------------------------------------------------- entry point
def model_from_config(cfg: TrainConfig, num_classes: int) -> nn.Module:
    if cfg.model.checkpoint:
        return load_checkpoint(cfg.model.checkpoint)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    stages = {k: v for k, v in (("blocks", cfg.model.blocks), ("channels", cfg.model.channels)) if v is not None}
    return create_model(cfg.model.name, num_classes, width=cfg.model.width, conv=cfg.model.conv, **stages)


def init_model(model: nn.Module, cfg: TrainConfig, data: Data) -> nn.Module:
    """The configured initialisations of a fresh model: dirac 3x3 convs, then the whitening stem, estimated
    on the first init.whiten_samples training images (normalised, not augmented)."""
    if cfg.init.dirac:  # step: identity-initialised 3x3 convs
        dirac_init(model)
    if cfg.init.whiten:  # step: whitening stem, weight frozen
        images = data.train.split.images[: cfg.init.whiten_samples]
        whiten_first_conv(model, data.train.augment(images, None).cpu())
    return model


def model_summary(model: nn.Module, one_view: bool = False) -> dict:
    """Size and score figures for summary.json (the score module counts them from the model). The score
    charges the test-time views the accuracy was measured with; ``one_view`` adds ``score_one_view``, the
    score of one forward pass per image (what a model is scored at without test-time augmentation), so that
    a 6-view run is not read against 1-view scores by mistake."""
    from .scoring import profile

    p = profile(model).to_dict()
    if one_view:
        p["score_one_view"] = p["score_params_term"] + p["score_ops_term"] / max(1, p["views"])
    return p


def train(cfg: TrainConfig, resume: bool = False, console=None, run: Run | None = None,
          data: Data | None = None):
    """Build data and model from ``cfg``, fit, test once, write the run directory. Returns (model, summary).

    ``data`` may be passed pre-built (it must match cfg.data), e.g. by a caller that already loaded it.
    Under torchrun, rank 0 makes the run directory and tests; other ranks return (model, None)."""
    def build(data: Data) -> nn.Module:
        model = model_from_config(cfg, data.num_classes)
        return model if cfg.model.checkpoint else init_model(model, cfg, data)

    return run_model_stage("train", cfg, _train_stage, build, resume=resume, run=run, data=data, console=console,
                           distributed_ranks=True)


def _train_stage(s: StageRun, model: nn.Module) -> tuple[nn.Module, dict | None]:
    """The training stage's algorithm: fit, keep the best or last weights, test once, save."""
    cfg, run, data, d, device = s.cfg, s.run, s.data, s.d, s.device
    t0 = time.perf_counter()
    state = fit(model, data, cfg, run, teacher=s.teacher, resume=s.resume, console=s.console, d=d)
    if not d.main:
        return model, None  # rank 0 tests and writes
    if cfg.keep == "best" and run.file("best.ckpt").exists():
        model = load_checkpoint(run.file("best.ckpt")).to(device)
    amp = resolve_precision(cfg.precision, device)
    if s.console is not None and cfg.final_test:  # minutes on a CPU with 6 views: say what is happening
        s.console.print(f"testing once: {len(data.test.split):,} images x {TTA_VIEWS[cfg.tta]} view(s)")
    test = final_test(model, data, amp, cfg)  # the only time the test split is read
    model = model.to("cpu").to(memory_format=torch.contiguous_format).float().eval()
    inference = inference_record(cfg, amp)
    # the stage's epochs: 9.9 when a fractional run ran to its end, the epochs run when it stopped early
    epochs = cfg.epochs if state.epoch >= math.ceil(cfg.epochs) else state.epoch
    best_val = state.kept_val("best")  # None: no validation split (val_size 0)
    last = state.history[-1] if state.history else {}
    kept_val = state.kept_val(cfg.keep)
    s.save(model, s.entry({"model": cfg.model.name, "epochs": epochs}, test, inference),
           test_accuracy=test["accuracy"], val_accuracy=kept_val, config=cfg.model_dump(mode="json"),
           inference=inference)
    return model, {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "val_accuracy": kept_val, "last_val_accuracy": last.get("val_accuracy"), "best_val_accuracy": best_val,
        "best_epoch": state.best_epoch if best_val is not None else None, "epochs": state.epoch,
        "seconds": state.seconds,
        "wall_seconds_this_process": time.perf_counter() - t0, "skipped_steps": state.skipped_steps,
        "tta": cfg.tta, "ema": cfg.ema, "device": str(device), "world_size": d.world,
        "precision": inference["precision"], "inference": inference,
        "model": cfg.model.name, "dataset": cfg.data.dataset, **model_summary(model, one_view=True),
    }  # the skeleton adds the command, the run folder and the teacher's leak record


@takes(TrainOptions)
def train_run(config: str | None = None, resume: bool = False, sets: list[str] | tuple[str, ...] = (),
              console=None, **options) -> dict | None:
    """``edlab train`` as a call: the config file (optional), named options (``model``, ``epochs``, ``lr``,
    ... the fields of edlab.options.TrainOptions) and ``sets`` (["optim.nesterov=false"]) -> the run's summary
    (None on a torchrun rank other than 0). ``console``: anything with ``.print(text)`` hears the epochs."""
    from .config import load_train_config

    named = TrainOptions.of(options)  # any other config key goes in sets
    if resume and not named.out:
        raise EdlabError("--resume needs --out RUN_DIR: the run to continue")
    cfg = load_train_config(config, named.config_tree(), list(sets))
    return train(cfg, resume=resume, console=console)[1]  # the module's train: monkeypatched in tests
