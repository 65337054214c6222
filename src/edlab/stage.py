"""The stage skeleton: what every model-producing stage (train, prune, quantize) does around its algorithm.

A stage sets its threads and seed, opens its run folder (or resumes it, refusing a config that changed),
builds its data, takes the model it starts from, loads its teacher and records how many validation images
that teacher (or an earlier stage's) trained on, runs its algorithm, saves model.ckpt with the stage history
and writes summary.json. Written once here, so that a fix to the resume or leak rules is made once, and a new
stage is its algorithm plus one call to :func:`run_model_stage`:

    def my_stage(s: StageRun, model):   # s: the config, run folder, data, device, teacher, leak record
        ...                              # the algorithm (fit(model, s.data, s.cfg, teacher=s.teacher), ...)
        test = final_test(model, s.data, None, s.cfg)
        inference = inference_record(s.cfg, None)
        s.save(model, s.entry({"what": 1}, test, inference), test_accuracy=test["accuracy"], ...)
        return model, {"test_accuracy": test["accuracy"], ...}   # summary.json, less what the skeleton adds

    run_model_stage("mine", cfg, my_stage, model)

Later stages inherit their TrainConfig from the checkpoint they start from (:func:`inherit_config`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from . import distill, distributed
from .checkpoint import save_checkpoint, upstream_val_leak, with_stage
from .config import TrainConfig, to_yaml
from .data import Data, data_from_config
from .device import host, resolve_device, use_threads
from .distributed import Dist
from .errors import EdlabError
from .runs import Run, command_line
from .views import TTA_VIEWS

Algorithm = Callable[["StageRun", nn.Module], tuple[nn.Module, dict | None]]


@dataclass
class StageRun:
    """What the skeleton hands a stage's algorithm: its config, run folder, data, device, teacher (None when
    it does not distil) and leak record (``distill.leak_record``: teacher, teacher_val_leak, val_leak)."""

    name: str  # the stage history's name for it: "train", "prune", "quantize"
    cfg: TrainConfig
    run: Run
    data: Data
    device: torch.device
    teacher: nn.Module | None = None
    leak: dict = field(default_factory=dict)
    console: Any = None
    resume: bool = False
    d: Dist = field(default_factory=Dist)

    def entry(self, own: dict, test: dict, inference: dict) -> dict:
        """This stage's line of the stage history: its name, its own figures, then what every stage records
        (the training subset, the test accuracy and the views it was measured with, the teacher's leak)."""
        return {"stage": self.name, **own, "train_subset": self.cfg.data.train_subset,
                "test_accuracy": test["accuracy"], "views": inference["views"],
                **({"teacher_val_leak": self.leak["teacher_val_leak"]} if self.teacher is not None else {})}

    def save(self, model: nn.Module, entry: dict, **meta) -> dict:
        """model.ckpt: ``meta`` plus the model's stage history with ``entry`` appended; the model then carries
        the same metadata (the score reads its views from it)."""
        meta["stages"] = with_stage(model, entry)
        save_checkpoint(model, self.run.file("model.ckpt"), **meta)
        model.edlab_metadata = meta
        return meta


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
                                  ("distill", "crop_pool", 0), ("model", "channels", None)):
        # saved before these existed: they were off (channels: the model's own widths)
        if isinstance(old.get(section), dict):
            old[section].setdefault(key, default)
    old = flatten(old)
    new = flatten(cfg.model_dump(mode="json"))
    free = {"threads", "tracker", "nan_policy", "grad_clip", "optim.lr", "out", "data.data_dir"}
    for key in sorted((set(old) | set(new)) - free):
        if old.get(key, "unset") != new.get(key, "unset"):
            return f"{key}: {old.get(key, 'unset')!r} saved, {new.get(key, 'unset')!r} now"
    return None


def same_run_config(saved, cfg: TrainConfig) -> bool:
    """Whether a saved run's config trains the same run as ``cfg`` (what --resume may continue)."""
    return config_change(saved, cfg) is None


def open_run(stage: str, cfg: TrainConfig, resume: bool, run: Run | None, name: str | None = None) -> Run:
    """The stage's run folder: made (``name``, else the config's name or model), or opened to resume, where a
    config that differs from the saved config.yaml is refused (the resumed epochs would train another run);
    config.yaml written."""
    if run is None:
        run = Run.open(cfg.out) if resume else Run.create(name or cfg.name or cfg.model.name, cfg.out)
    if resume:
        saved = run.file("config.yaml")
        change = config_change(saved, cfg) if saved.exists() else None
        if change:
            how = f"config (edlab train {saved} --out {run.path} --resume)" if stage == "train" else "options"
            raise EdlabError(f"--resume: the config differs from the one saved in {saved} ({change}); resume "
                             f"with the same {how}")
    run.write_text("config.yaml", to_yaml(cfg))
    return run


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


def inherit_config(model: nn.Module, *layers: dict | Callable[[TrainConfig], dict], sets=()) -> TrainConfig:
    """A later stage's TrainConfig: the config ``model``'s checkpoint was trained with (``edlab train`` saves
    it) < ``layers`` (the stage's defaults, then the caller's options; a layer may be a function of the
    inherited config, e.g. a tenth of its lr) < ``sets`` ("optim.lr=0.01"). What is not inherited: the run's
    folder and name, final_test (a study's untested trial: its later stages still test unless told), the
    source checkpoint, and the source's own teacher and crop pool. The validation split is the source's
    held-out one; a stage that would validate on images the source trained on is refused."""
    from .config import build, parse_overrides
    from .data import check_split, source_split

    saved = copy.deepcopy(getattr(model, "edlab_metadata", {}).get("config") or {})
    for key in ("out", "name", "final_test"):
        saved.pop(key, None)
    saved.setdefault("model", {})["checkpoint"] = None
    saved["distill"] = {**saved.get("distill", {}), "teacher": None, "crop_pool": 0}
    source = source_split(saved)
    saved.setdefault("data", {})["split_seed"] = source["split_seed"]  # validate on the source's held-out split
    base = build(TrainConfig, saved)
    layers = [layer(base) if callable(layer) else layer for layer in layers]
    cfg = build(TrainConfig, base.model_dump(), *layers, parse_overrides(list(sets)))
    check_split(source, cfg.data.dataset, cfg.data.val_size, cfg.data.split_seed)
    return cfg


def run_model_stage(stage: str, cfg: TrainConfig, algorithm: Algorithm, model: nn.Module | Callable[[Data], nn.Module],
              *, name: str | None = None, resume: bool = False, run: Run | None = None, data: Data | None = None,
              console=None, source_teaches: bool = False, teacher_in_summary: bool = True,
              distributed_ranks: bool = False) -> tuple[nn.Module, dict | None]:
    """Run one stage: ``algorithm(stage, model) -> (model, summary)`` inside the skeleton. Returns what it
    returned, the summary as written to summary.json (with the command, the run folder and the leak record).

    ``model``: the model the stage starts from, or a function of the data that builds it (training from
    scratch). ``name``: the new run folder's name (default: the config's name, else its model). ``run`` and
    ``data`` may be passed pre-built. ``source_teaches``: the starting model is the teacher (``--distill``);
    otherwise ``cfg.distill.teacher`` is, if set. ``teacher_in_summary``: False when the stage records its
    teacher elsewhere (quantize, in its options): the summary then gets only ``val_leak``.
    ``distributed_ranks``: under torchrun, rank 0 makes the folder and writes; the others run the algorithm
    and return (model, None). A folder this call made is removed again if the stage fails before its
    algorithm starts (no data, a bad teacher), so that the same command works once the cause is fixed."""
    cfg = with_split_seed(cfg)
    distill.check_teacher(cfg.distill.teacher)  # before any run folder or data is made
    torch.manual_seed(cfg.seed)
    use_threads(cfg.threads)
    d = distributed.setup(cfg.device) if distributed_ranks else Dist()
    device = distributed.rank_device(d, resolve_device(cfg.device))
    error, path = None, None
    fresh = run is None and not resume  # a folder this call makes
    if d.main:
        try:
            run = open_run(stage, cfg, resume, run, name)
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
        if callable(model) and not isinstance(model, nn.Module):
            model = model(data)
        teacher = copy.deepcopy(model).float().eval() if source_teaches else \
            distill.load_teacher(cfg.distill.teacher, data.num_classes, cfg.data) if cfg.distill.teacher else None
        # before the algorithm: the earlier stages' teachers are in the starting model's history
        leak = distill.leak_record(teacher, "source" if source_teaches else cfg.distill.teacher,
                                   upstream_val_leak(model))
    except EdlabError:
        if d.main and fresh:
            run.discard()
        raise
    s = StageRun(stage, cfg, run, data, device, teacher, leak, console, resume, d)
    model, summary = algorithm(s, model)
    if summary is not None:
        summary = {**summary, "command": command_line(), "run_dir": str(run.path), "host": host(),
                   **(leak if teacher_in_summary else {"val_leak": leak["val_leak"]})}
        run.write_summary(summary)
        run.close()
    distributed.barrier(d)  # rank 0 tested and wrote; torchrun ends all ranks together
    distributed.teardown(d)
    return model, summary
