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

import hashlib
import io
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import crop_pool, mix
from .checkpoint import save_checkpoint, upstream_val_leak, with_stage
from .config import OptimConfig, SchedConfig, TrainConfig, to_yaml
from .data import Data, get_data
from .distributed import Dist
from .errors import EdlabError
from .files import atomic_write_bytes
from .loader import load_checkpoint
from .models import create_model
from .runs import Run, command_line
from .tricks import (
    Lookahead,
    bn_biases,
    dirac_init,
    first_conv,
    freeze_bn_weights,
    set_bn_momentum,
    set_whiten_bias_trainable,
    whiten_first_conv,
)
from .views import TTA_VIEWS, tta_logits


# ---------------------------------------------------------------------------------------------- device
def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdlabError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """oneDNN has native bf16 kernels here (AVX512-BF16 or AMX): bf16 autocast then ~2x a training step."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, None = fp32. 'auto' picks bf16 on CUDA and on CPUs with native bf16 kernels."""
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_channels_last(choice: str, device: torch.device, amp: torch.dtype | None) -> bool:
    if choice == "auto":
        return device.type == "cuda" or amp is not None
    return choice == "on"


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


# ------------------------------------------------------------------------------------------- optimizer
def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.freeze_bn_weight:  # step: BN scales stay at 1
        freeze_bn_weights(model)
    params = [p for p in model.parameters() if p.requires_grad]
    scaled = bn_biases(model) if cfg.bn_bias_lr_scale != 1 else set()
    shifts = [p for p in params if id(p) in scaled]  # step: BN biases at lr x bn_bias_lr_scale
    params = [p for p in params if id(p) not in scaled]
    if cfg.no_decay_bn_bias:  # BN scales/shifts and biases: decaying them only hurts
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if shifts:  # the lr scale is kept in the group; the loop sets lr = schedule x lr_scale
        wd = 0.0 if cfg.no_decay_bn_bias else cfg.weight_decay / cfg.bn_bias_lr_scale  # same decay per step
        groups.append({"params": shifts, "weight_decay": wd, "lr_scale": cfg.bn_bias_lr_scale})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=cfg.betas)


class LRSchedule:
    """Learning-rate factor per optimizer step (closed form) plus the plateau rule on validation loss.

    Closed forms are resumable by step number alone; plateau keeps (best, bad epochs, scale) as state.
    """

    def __init__(self, cfg: SchedConfig, epochs: float, steps_per_epoch: int, lr: float | None = None):
        self.cfg, self.steps_per_epoch = cfg, max(1, steps_per_epoch)
        self.floor = min(1.0, cfg.min_lr / lr) if lr else 0.0  # cosine ends at min_lr (a factor of lr)
        self.total = max(1, total_steps(epochs, self.steps_per_epoch))
        self.warmup = cfg.warmup_epochs * self.steps_per_epoch
        self.scale, self.best, self.bad = 1.0, math.inf, 0

    def factor(self, step: int) -> float:
        c = self.cfg
        if c.name == "onecycle":
            rise = c.pct_start * self.total
            if step < rise:
                return 1 / 25 + (1 - 1 / 25) * step / rise
            t = (step - rise) / max(1, self.total - rise)
            return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if c.name == "linear":  # airbench94: start_factor -> 1 over pct_start of the steps, then -> end_factor
            rise = int(c.pct_start * self.total)
            if step < rise:
                return c.start_factor + (1 - c.start_factor) * step / rise
            t = min(1.0, (step - rise) / max(1, self.total - rise))
            return 1 + (c.end_factor - 1) * t
        if self.warmup and step < self.warmup:
            return 1 / 25 + (1 - 1 / 25) * step / self.warmup
        if c.name == "cosine":
            t = (step - self.warmup) / max(1, self.total - self.warmup)
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if c.name == "step":
            return c.gamma ** (step // self.steps_per_epoch // c.step_size)
        if c.name == "plateau":
            return self.scale
        return 1.0

    def epoch_end(self, val_loss: float | None) -> None:
        if self.cfg.name != "plateau" or val_loss is None:
            return
        if val_loss < self.best * (1 - 1e-4):
            self.best, self.bad = val_loss, 0
        else:
            self.bad += 1
            if self.bad > self.cfg.patience:
                self.scale *= self.cfg.factor
                self.bad = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, s: dict) -> None:
        self.scale, self.best, self.bad = s["scale"], s["best"], s["bad"]


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: a fractional epoch count (9.9) ends partway through its last epoch."""
    return math.ceil(round(epochs * steps_per_epoch, 6))


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: torch.dtype | None = None, tta: str = "none") -> dict:
    """Mean cross-entropy and accuracy over a loader (sums kept on device: one sync at the end)."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    first = next(model.parameters(), None)  # a half model (edlab eval --half) takes half inputs
    dtype = first.dtype if first is not None else torch.float32  # no parameters: an ONNX Runtime model
    for x, y in loader:
        x = x.to(dtype)
        with autocast(device, amp):
            out = tta_logits(model, x, tta)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    model.train(was_training)
    return {"loss": float(loss_sum) / max(1, n), "accuracy": float(correct) / max(1, n)}


def final_test(model: nn.Module, data, amp: torch.dtype | None, cfg: TrainConfig) -> dict:
    """The stage's one reading of the test split, or None figures when ``cfg.final_test`` is off (a study that
    tests only its chosen points: the others' test accuracy is never seen)."""
    if not cfg.final_test:
        return {"accuracy": None, "loss": None}
    return evaluate(model, data.test, amp, cfg.tta)


def pct(v: float | None) -> str:
    """An accuracy as '91.25%', or 'untested' (final_test off)."""
    return "untested" if v is None else f"{100 * v:.2f}%"


# --------------------------------------------------------------------------------------------- fitting
class EMA:
    """Exponential moving average of the weights and BN statistics (Polyak averaging).

    The average of the last ~1/(1-decay) steps sits nearer the centre of the basin SGD bounces around in,
    so it validates better than the last iterate; the warm-up (1+t)/(10+t) keeps the random initial
    weights from lingering in the average early on."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # (average, source) tensor pairs, found once: the step loop only updates them in place
        avg, cur = self.model.state_dict(), model.state_dict()
        self._floats = ([avg[k] for k, v in avg.items() if v.dtype.is_floating_point],
                        [cur[k].detach() for k, v in avg.items() if v.dtype.is_floating_point])
        self._ints = [(avg[k], cur[k]) for k, v in avg.items() if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the weights of the model it was made from (call after each step)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(*self._floats, 1 - d)
        for a, c in self._ints:  # integer buffers (BN's num_batches_tracked): the current value
            a.copy_(c)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.updates = s["updates"]


@dataclass
class FitState:
    """Everything needed to continue training after the last finished epoch."""

    epoch: int = 0  # next epoch to run
    best_val: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    seconds: float = 0.0
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)


def use_threads(threads: int | None) -> None:
    """Config ``threads``: torch's CPU threads, at most the cores this process may use. On a shared machine
    fewer threads than cores avoids OpenMP stalls; more than the cores only wait on each other (threads=1024
    made a tiny run 30x slower on 2 cores)."""
    if threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(min(threads, cores))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, hard: torch.Tensor, t: float,
                 alpha: float) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard, where ``hard`` is
    the label loss (cross-entropy, mixup-weighted when mixing). T^2 keeps the soft term's gradient at the
    scale of the hard one whatever the temperature."""
    soft = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard


def check_teacher(path: str | None) -> None:
    """A teacher file that is not there is refused before any run folder or data is made."""
    import os

    if path and not os.path.isfile(path):
        raise EdlabError(f"teacher checkpoint not found: {path}")


def load_teacher(path: str, num_classes: int, data_cfg=None) -> nn.Module:
    """The teacher checkpoint as a float32 eval-mode model, refused in one line when its classes differ.

    With the student's ``data_cfg`` (a DataConfig, split seed written out), a teacher that was trained on
    images of the student's validation split is warned about (``teacher_split_leak``), and the count is kept
    as ``teacher.edlab_val_leak``."""
    teacher = load_checkpoint(path).float().eval().requires_grad_(False)
    out = teacher(torch.zeros(1, 3, 32, 32)).shape[-1]
    if out != num_classes:
        raise EdlabError(f"teacher {path} predicts {out} classes, the data has {num_classes}")
    if data_cfg is not None:
        teacher.edlab_val_leak = teacher_split_leak(teacher, path, data_cfg)
    return teacher


def teacher_split_leak(teacher: nn.Module, path: str, data_cfg) -> int | None:
    """How many of the student's validation images the teacher trained on (warned about), None when its
    checkpoint does not say how it was trained. Such a teacher carries what it learnt of those images into
    the student through its logits on their training neighbours, so the student's validation accuracy reads
    high and every choice made on it is biased. Measured once (CIFAR-10 JPEG copy): a depthwise student
    distilled from an airbench94 teacher trained on all 50,000 images read 1.46 points higher on validation
    than on test; trained alone, 0.43."""
    from .data import check_split, source_split

    config = (getattr(teacher, "edlab_metadata", None) or {}).get("config")
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict) or data_cfg.split_seed is None:
        return None
    return check_split(source_split(config), data_cfg.dataset, data_cfg.val_size, data_cfg.split_seed,
                       teacher=path)


def leak_record(teacher: nn.Module | None, path: str | None, upstream: int) -> dict:
    """What a stage's summary says of its teacher: the checkpoint, how many validation images it trained on
    (None: its checkpoint does not say) and ``val_leak``, the most images any teacher, this stage's or an
    earlier stage's, trained on (``edlab report`` marks the val of such a run)."""
    own = getattr(teacher, "edlab_val_leak", None) if teacher is not None else None
    out = {"teacher": path, "teacher_val_leak": own} if teacher is not None else {}
    return {**out, "val_leak": max(upstream, own or 0)}


def cached_views(loader) -> int:
    """How many fixed views of each training image the batches can show: 1 when they are the images as
    stored (augment none), 2 when the only augmentation is a mirror (crop-flip with crop_pad 0), 0 when they
    vary more (crops, warps, cutout). With 1 or 2 the teacher's logits depend on (image, mirrored) alone and
    are computed once (``teacher_table``) instead of on every step."""
    aug = loader.augment
    if getattr(aug, "cutout", 0):
        return 0
    policy = getattr(aug, "policy", None)
    if policy == "none":
        return 1
    return 2 if policy == "crop-flip" and getattr(aug, "crop_pad", None) == 0 else 0


@torch.no_grad()
def teacher_table(teacher: nn.Module, loader, amp: torch.dtype | None, views: int = 1, batch: int = 1000,
                  pool: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's logits of every training image, one row per image of the split (views 1), or of every
    image and its mirror ([N, 2, classes], views 2): a step then reads its rows by (index, mirrored). With a
    crop ``pool`` ([N, K, 2] offsets): of each pooled crop and its mirror, [N, K, 2, classes], made by the
    loader's own augmentation (the exact tensors a step shows the student), read by (index, view, mirrored)."""
    images = loader.split.images
    rows = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        with autocast(loader.device, amp):
            if pool is not None:
                views_of = [teacher(loader.augment(chunk, None, torch.full((len(chunk),), m, device=chunk.device),
                                                   pool[i:i + batch, k])).float()
                            for k in range(pool.shape[1]) for m in (False, True)]
                rows.append(torch.stack(views_of, 1).unflatten(1, (pool.shape[1], 2)))
                continue
            x = loader.augment(chunk, None)  # normalised, unaugmented (mirroring commutes with it)
            out = teacher(x).float()
            rows.append(out if views == 1 else torch.stack([out, teacher(x.flip(3)).float()], 1))
    return torch.cat(rows) if rows else torch.zeros(0, 0, device=loader.device)


TABLE_FILE = "teacher-table.pt"  # the run's cached teacher logits while it trains: a resume reads them back


def _table_key(teacher: nn.Module, loader, amp: torch.dtype | None, views: int, batch: int = 1000,
               pool: torch.Tensor | None = None) -> str:
    """sha256 of what the table depends on: the teacher's weights and buffers, the teacher's exact inputs
    (the split's images, normalised, and with a crop pool its offsets, padding and fill) and the views and
    precision. Hashing ~0.5 GB takes about a second; the table it saves took minutes. Without a pool the key
    is what it was before pools existed (a table saved then is still read back)."""
    head = f"edlab-teacher-table/1 views={views} amp={amp}"
    if pool is not None:
        head += f" pool={tuple(pool.shape)} pad={loader.augment.crop_pad} fill={loader.augment.crop_fill}"
    h = hashlib.sha256(head.encode())
    if pool is not None:
        h.update(pool.cpu().contiguous().numpy().tobytes())
    for k, v in teacher.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    images = loader.split.images
    h.update(str(tuple(images.shape)).encode())
    for i in range(0, len(images), batch):
        h.update(loader.augment(images[i:i + batch], None).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def saved_teacher_table(teacher: nn.Module, loader, amp: torch.dtype | None, views: int, path=None,
                        write: bool = True, pool: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """``teacher_table``, kept in ``path`` so that a resumed run (``--resume`` after a kill, the next
    session's continuation) reads it back instead of paying the teacher's pass again (4-5 minutes for
    airbench94 on 45,000 images and their mirrors on 2 CPU cores). The file is used only when its key
    matches this teacher and these inputs; an unreadable or stale file is recomputed and replaced. Returns
    (table, reused). ``pool``: a crop pool's offsets (``teacher_table``), part of the key."""
    key = _table_key(teacher, loader, amp, views, pool=pool) if path is not None else None
    if path is not None and path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("table"), torch.Tensor):
                return saved["table"].to(loader.device), True
        except Exception:  # a torn or foreign file: the teacher's pass below replaces it
            pass
    table = teacher_table(teacher, loader, amp, views, pool=pool)
    if path is not None and write:
        buf = io.BytesIO()
        torch.save({"key": key, "table": table.cpu()}, buf)
        atomic_write_bytes(path, buf.getvalue())
    return table, False


def table_rows(table: torch.Tensor, loader) -> torch.Tensor:
    """The cached teacher logits of the loader's last batch."""
    if table.dim() == 2:
        return table[loader.index]
    if table.dim() == 4:  # a crop pool: the pooled crop and mirror each image of the batch shows
        return table[loader.index, loader.view, loader.mirrored.long()]
    return table[loader.index, loader.mirrored.long()]  # image and mirror: the view the batch shows


RESUME_MAGIC = b"edlab-resume/1\n"  # then the sha256 of the rest (32 bytes), then torch.save's bytes


def _save_resume(path, model, opt, sched: LRSchedule, state: FitState, scaler, ema: EMA | None = None,
                 look: Lookahead | None = None) -> None:
    """torch.save's bytes behind a sha256: a flipped byte must not resume silently with other weights."""
    import hashlib

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "sched": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "lookahead": look.state_dict() if look is not None else None,
                "state": {k: v for k, v in state.__dict__.items()}}, buf)
    body = buf.getvalue()
    atomic_write_bytes(path, RESUME_MAGIC + hashlib.sha256(body).digest() + body)


def _resume_bytes(path) -> bytes:
    """The torch.save bytes of a resume file, verified. Files from before the checksum (a bare torch.save
    zip, 'PK') still load; anything else must carry a matching sha256."""
    import hashlib

    raw = open(path, "rb").read()
    if raw[:2] == b"PK":
        return raw
    n = len(RESUME_MAGIC)
    if raw[:n] != RESUME_MAGIC or hashlib.sha256(raw[n + 32:]).digest() != raw[n:n + 32]:
        raise EdlabError(f"resume state {path} is corrupt (checksum mismatch); start the run again without "
                         f"--resume, or in another --out")
    return raw[n + 32:]


def read_resume(path) -> dict:
    """The contents of a resume file (checksum verified; weights_only: no code can run)."""
    return torch.load(io.BytesIO(_resume_bytes(path)), map_location="cpu", weights_only=True)


def _fit_state(s, epochs: int) -> FitState:
    """FitState from a resume file, each field of the right type and range (no traceback on a bad one)."""
    fields = FitState.__dataclass_fields__
    if not isinstance(s, dict) or set(s) != set(fields):
        raise ValueError("state fields")
    state = FitState(**s)
    ints = (state.epoch, state.best_epoch, state.bad_epochs, state.skipped_steps)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or not 0 <= state.epoch <= epochs \
            or not isinstance(state.history, list) or len(state.history) != state.epoch \
            or not all(isinstance(r, dict) for r in state.history) \
            or not all(isinstance(v, int | float) for v in (state.best_val, state.seconds)):
        raise ValueError("state values")
    return state


def _load_resume(path, model, opt, sched: LRSchedule, scaler, ema: EMA | None = None,
                 epochs: int | None = None, look: Lookahead | None = None) -> FitState:
    body = _resume_bytes(path)  # outside the try: a checksum mismatch has its own message
    try:  # weights_only: plain tensors and containers, no code can run
        blob = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        state = _fit_state(blob["state"], epochs if epochs is not None else 1 << 30)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        if ema is not None:
            ema.load_state_dict(blob["ema"])
        if look is not None:
            look.load_state_dict(blob["lookahead"])
        sched.load_state_dict(blob["sched"])
        if scaler is not None and blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
    except Exception as e:
        raise EdlabError(f"resume state {path} is unreadable or malformed ({type(e).__name__}); "
                         f"start the run again without --resume") from None
    return state


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
            state = _load_resume(run.file("resume.pt"), model, opt, sched, scaler, ema, math.ceil(cfg.epochs), look)
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
        views = cached_views(data.train) if cfg.data.mixup == 0 and cfg.data.cutmix == 0 else 0
        pool = None
        if cfg.distill.crop_pool:  # the config refuses it beside anything but plain crop-flip
            pool = crop_pool(len(data.train.split), cfg.distill.crop_pool, data.train.augment.crop_pad,
                             data.train.seed).to(device)
            data.train.pool, views = pool, 2 * cfg.distill.crop_pool
        if views and state.epoch < math.ceil(cfg.epochs):
            path = run.file(TABLE_FILE) if run is not None else None
            table, reused = saved_teacher_table(teacher, data.train, amp, views, path, write=d.main, pool=pool)
            if console is not None:
                console.print(f"teacher logits: {len(table)} images x {views} view(s) "
                              + (f"read back from {path}" if reused else "computed once"))
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
            t_out = table_rows(table, data.train) if table is not None else None  # the cached teacher rows
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
                    loss = distill_loss(out.float(), t_out.float(), loss, cfg.distill.temperature,
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
            _save_resume(run.file("resume.pt"), model, opt, sched, state, scaler, ema, look)
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
        run.file(TABLE_FILE).unlink(missing_ok=True)
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
    blocks = {"blocks": cfg.model.blocks} if cfg.model.blocks is not None else {}  # only the ResNets take it
    return create_model(cfg.model.name, num_classes, width=cfg.model.width, conv=cfg.model.conv, **blocks)


def init_model(model: nn.Module, cfg: TrainConfig, data: Data) -> nn.Module:
    """The configured initialisations of a fresh model: dirac 3x3 convs, then the whitening stem, estimated
    on the first init.whiten_samples training images (normalised, not augmented)."""
    if cfg.init.dirac:  # step: identity-initialised 3x3 convs
        dirac_init(model)
    if cfg.init.whiten:  # step: whitening stem, weight frozen
        images = data.train.split.images[: cfg.init.whiten_samples]
        whiten_first_conv(model, data.train.augment(images, None).cpu())
    return model


def data_from_config(cfg: TrainConfig, device: torch.device) -> Data:
    d = cfg.data
    return get_data(d.dataset, d.data_dir, d.batch_size, d.augment, d.val_size, d.train_subset, d.cutout,
                    d.eval_batch_size, cfg.seed, device, download=d.download, split_seed=d.split_seed,
                    crop_pad=d.crop_pad, crop_fill=d.crop_fill, flip=d.flip)


def with_split_seed(cfg: TrainConfig) -> TrainConfig:
    """The config with its validation split's seed written out (the run's seed when unset), so that the
    checkpoint records the split and every later stage inherits it."""
    if cfg.data.split_seed is not None:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.data.split_seed = cfg.seed
    return cfg


def inference_record(cfg: TrainConfig, amp: torch.dtype | None, precision: str | None = None) -> dict:
    """How the reported accuracy was measured, per image: test-time views (the score multiplies f by them)
    and the arithmetic (``precision`` names it when it is not an autocast dtype, e.g. a half model). Stored
    in checkpoints and summaries; ``edlab.scoring.views_of`` reads it back."""
    return {"tta": cfg.tta, "views": TTA_VIEWS[cfg.tta],
            "precision": precision or (str(amp).replace("torch.", "") if amp else "fp32")}


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


def config_change(saved, cfg: TrainConfig) -> str | None:
    """The first config key that differs from the saved config.yaml, in words ('optim.momentum: 0.9 saved,
    0.5 now'), or None. What may change on resume: the thread count, the tracker, and what cures a diverged
    run (a lower lr, gradient clipping, the NaN policy): the resumed epochs then use the new values. Where
    the run and its data live (``out``, ``data.data_dir``) may change too: a run folder copied to another
    path or machine continues there (portable runs)."""
    import yaml

    from .runs import flatten

    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return f"{saved} is unreadable"
    if not isinstance(old, dict):
        return f"{saved} is not a config"
    if isinstance(old.get("data"), dict) and old["data"].get("split_seed") is None:  # saved before split_seed
        old["data"]["split_seed"] = old.get("seed", 0)
    old.setdefault("final_test", True)  # saved before final_test existed: those runs tested
    for section, key, default in (("data", "cutmix", 0.0), ("data", "mix_switch_prob", 0.5),
                                  ("distill", "crop_pool", 0)):  # saved before these existed: they were off
        if isinstance(old.get(section), dict):
            old[section].setdefault(key, default)
    old = flatten(old)
    new = flatten(cfg.model_dump(mode="json"))
    free = {"threads", "tracker", "nan_policy", "grad_clip", "optim.lr", "out", "data.data_dir"}
    for key in sorted((set(old) | set(new)) - free):
        if old.get(key, "unset") != new.get(key, "unset"):
            return f"{key}: {old.get(key, 'unset')!r} saved, {new.get(key, 'unset')!r} now"
    return None


def _same_run_config(saved, cfg: TrainConfig) -> bool:
    return config_change(saved, cfg) is None


def _open_run(cfg: TrainConfig, resume: bool, run: Run | None) -> Run:
    if run is None:
        run = Run.open(cfg.out) if resume else Run.create(cfg.name or cfg.model.name, cfg.out)
    if resume:
        saved = run.file("config.yaml")
        change = config_change(saved, cfg) if saved.exists() else None
        if change:
            raise EdlabError(f"--resume: the config differs from the one saved in {saved} ({change}); resume "
                             f"with the same config (edlab train {saved} --out {run.path} --resume)")
    run.write_text("config.yaml", to_yaml(cfg))
    return run


def train(cfg: TrainConfig, resume: bool = False, console=None, run: Run | None = None,
          data: Data | None = None):
    """Build data and model from ``cfg``, fit, test once, write the run directory. Returns (model, summary).

    ``data`` may be passed pre-built (it must match cfg.data), e.g. by a caller that already loaded it.
    Under torchrun, rank 0 makes the run directory and tests; other ranks return (model, None)."""
    from . import distributed

    cfg = with_split_seed(cfg)
    check_teacher(cfg.distill.teacher)
    torch.manual_seed(cfg.seed)
    use_threads(cfg.threads)
    d = distributed.setup(cfg.device)
    device = distributed.rank_device(d, resolve_device(cfg.device))
    error, path = None, None
    fresh = run is None and not resume  # a folder this call makes: undone if the run fails before training
    if d.main:
        try:
            run = _open_run(cfg, resume, run)
            path = str(run.path)
        except EdlabError as e:
            if not d.active:
                raise
            error = str(e)
    error, path = distributed.broadcast(d, (error, path))  # every rank stops, or every rank uses rank 0's dir
    if error:
        raise EdlabError(error)
    if not d.main:
        run, console = Run.open(path), None
    try:
        data = data or data_from_config(cfg, device)
        model = model_from_config(cfg, data.num_classes)
        if not cfg.model.checkpoint:
            init_model(model, cfg, data)
        teacher = load_teacher(cfg.distill.teacher, data.num_classes, cfg.data) if cfg.distill.teacher else None
        leak = leak_record(teacher, cfg.distill.teacher, upstream_val_leak(model))  # before fit: earlier stages
    except EdlabError:
        if d.main and fresh:  # nothing trained yet: the same command must work once the cause is fixed
            run.discard()
        raise
    t0 = time.perf_counter()
    state = fit(model, data, cfg, run, teacher=teacher, resume=resume, console=console, d=d)
    if not d.main:
        distributed.barrier(d)  # rank 0 tests and writes; wait so that torchrun ends all ranks together
        distributed.teardown(d)
        return model, None
    if cfg.keep == "best" and run.file("best.ckpt").exists():
        model = load_checkpoint(run.file("best.ckpt")).to(device)
    amp = resolve_precision(cfg.precision, device)
    if console is not None and cfg.final_test:  # minutes on a CPU with 6 views: say what is happening
        console.print(f"testing once: {len(data.test.split):,} images x {TTA_VIEWS[cfg.tta]} view(s)")
    test = final_test(model, data, amp, cfg)  # the only time the test split is read
    model = model.to("cpu").to(memory_format=torch.contiguous_format).float().eval()
    inference = inference_record(cfg, amp)
    # the stage's epochs: 9.9 when a fractional run ran to its end, the epochs run when it stopped early
    epochs = cfg.epochs if state.epoch >= math.ceil(cfg.epochs) else state.epoch
    stages = with_stage(model, {"stage": "train", "model": cfg.model.name, "epochs": epochs,
                                "train_subset": cfg.data.train_subset,
                                "test_accuracy": test["accuracy"], "views": inference["views"],
                                **({"teacher_val_leak": leak["teacher_val_leak"]} if teacher is not None else {})})
    best_val = state.best_val if state.best_epoch > 0 else None  # None: no validation split (val_size 0)
    meta = dict(test_accuracy=test["accuracy"], val_accuracy=best_val, config=cfg.model_dump(mode="json"),
                inference=inference, stages=stages)
    save_checkpoint(model, run.file("model.ckpt"), **meta)
    model.edlab_metadata = meta
    last = state.history[-1] if state.history else {}
    summary = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "val_accuracy": last.get("val_accuracy"), "best_val_accuracy": best_val,
        "best_epoch": state.best_epoch if best_val is not None else None, "epochs": state.epoch,
        "seconds": state.seconds,
        "wall_seconds_this_process": time.perf_counter() - t0, "skipped_steps": state.skipped_steps,
        "tta": cfg.tta, "ema": cfg.ema, "device": str(device), "world_size": d.world,
        "precision": inference["precision"], "inference": inference,
        "model": cfg.model.name, "dataset": cfg.data.dataset, **model_summary(model, one_view=True),
        "command": command_line(), "run_dir": str(run.path),
    }
    summary.update(leak)  # a teacher (here or upstream) that saw the validation images makes val read high
    run.write_summary(summary)
    run.close()
    distributed.barrier(d)
    distributed.teardown(d)
    return model, summary


def train_run(config: str | None = None, resume: bool = False, sets: list[str] | tuple[str, ...] = (),
              console=None, **options) -> dict | None:
    """``edlab train`` as a call: the config file (optional), named options (``model``, ``epochs``, ``lr``,
    ... as in edlab.config.TRAIN_FLAGS) and ``sets`` (["optim.nesterov=false"]) -> the run's summary
    (None on a torchrun rank other than 0). ``console``: anything with ``.print(text)`` hears the epochs."""
    from .config import TRAIN_FLAGS, flags_to_tree, load_train_config

    unknown = sorted(set(options) - set(TRAIN_FLAGS))
    if unknown:
        raise EdlabError(f"unknown training option(s) {', '.join(unknown)} (named options: {', '.join(TRAIN_FLAGS)}; "
                         f"any other config key goes in sets)")
    if resume and not options.get("out"):
        raise EdlabError("--resume needs --out RUN_DIR: the run to continue")
    cfg = load_train_config(config, flags_to_tree(options, TRAIN_FLAGS), list(sets))
    return train(cfg, resume=resume, console=console)[1]  # the module's train: monkeypatched in tests


DATASETS = ("cifar10", "cifar100", "synthetic")


def evaluate_checkpoint(checkpoint: str, dataset: str | None = None, data_dir: str | None = None,
                        half: bool = False, batch_size: int = 1000, device: str = "auto", tta: str = "trained",
                        progress=None) -> dict:
    """``edlab eval`` as a call: re-measure the test accuracy of a checkpoint, packed or .onnx file (or run
    folder) on the dataset it was trained on, with the views it was measured with (``tta="trained"``).
    Returns {checkpoint, dataset, precision, tta, views, test_accuracy, test_loss, images}.
    ``progress(text)``, if given, hears what is about to be evaluated."""
    from .checkpoint import trained_with
    from .loader import load_model, resolve_model_path

    if dataset is not None and dataset not in DATASETS:
        raise EdlabError(f"unknown dataset '{dataset}' (choices: {', '.join(DATASETS)})")
    if tta != "trained" and tta not in TTA_VIEWS:
        raise EdlabError(f"unknown tta '{tta}' (choices: {', '.join(TTA_VIEWS)}, trained)")
    checkpoint = resolve_model_path(checkpoint)
    onnx = checkpoint.endswith(".onnx")
    model = load_model(checkpoint) if onnx else load_checkpoint(checkpoint)
    meta = model.edlab_metadata if isinstance(getattr(model, "edlab_metadata", None), dict) else {}
    trained = trained_with(model)  # checked metadata: never a folder to create or a download to try
    recorded = meta.get("dataset") if meta.get("dataset") in DATASETS else None
    dataset = dataset or recorded or trained["dataset"] or "cifar10"
    dev = resolve_device("cpu" if onnx else device)  # ONNX Runtime runs here on the CPU
    if onnx and half:
        raise EdlabError("--half applies to checkpoints; an ONNX file runs in the precision it was exported in")
    data = get_data(dataset, data_dir or trained["data_dir"], batch_size=batch_size, val_size=0,
                    eval_batch_size=batch_size, device=dev, download=False)
    model.to(dev)
    precision = "fp32"
    if half:
        dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
        model.to(dtype)
        precision = str(dtype).replace("torch.", "")
    if tta == "trained":
        inference = meta.get("inference") if isinstance(meta.get("inference"), dict) else {}
        tta = inference.get("tta") if inference.get("tta") in TTA_VIEWS else trained["tta"]
    if progress is not None:
        progress(f"evaluating {len(data.test.split):,} test images x {TTA_VIEWS[tta]} view(s) on {dev}")
    r = evaluate(model, data.test, tta=tta)
    if onnx:
        precision = (model.edlab_metadata.get("inference") or {}).get("precision", "fp32") + " (ONNX Runtime)"
    return {"checkpoint": checkpoint, "dataset": dataset, "precision": precision, "tta": tta,
            "views": TTA_VIEWS[tta],
            "test_accuracy": r["accuracy"], "test_loss": r["loss"], "images": len(data.test.split)}
