"""Every training hyper-parameter in one place, validated.

A config is YAML (nested sections below) plus ``--set section.key=value`` overrides; the common ones
also have CLI flags. Unknown keys, wrong types and absurd values are refused with one line naming the
key and, where there are some, the valid choices. Each key's comment says what it sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EdlabError

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-=@,")


def safe_name(v: str) -> str:
    """A run, recipe or study name becomes a folder name under runs/: one plain path component, so
    that '../x' or '/etc' can never put a run outside runs/."""
    if not v or v.startswith(".") or not set(v) <= NAME_CHARS or len(v) > 120:
        raise ValueError("a name is one folder name of letters, digits and ._+-=@, (not starting with '.')")
    return v


class Section(BaseModel):
    # no config value is ever meant to be inf or nan: refuse them (warmup_epochs=inf hung the schedule)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = "resnet20"  # a registered model (edlab.models.list_models())
    width: float = Field(1.0, gt=0, le=16)  # multiplier of every channel count
    conv: str = "standard"  # block 3x3 convs: standard | depthwise | separable | grouped:G, or one per stage "a,b,c"
    blocks: list[int] | None = None  # ResNets: blocks per stage, e.g. [2, 3, 3]; None = the model's own depths
    channels: list[int] | None = None  # channels per stage, e.g. [12, 32, 72]; None = the model's own widths
    checkpoint: str | None = None  # start from this checkpoint instead of a fresh model (fine-tuning)
    bn_momentum: float | None = Field(None, gt=0, le=1)  # BN running statistics: weight of each new batch
    # (PyTorch's convention); None = the model's own (0.1). airbench94: 0.4, which keeps up with fast-moving
    # weights (its 64x BN-bias lr) so that evaluation-mode BN matches training

    @field_validator("blocks", "channels", mode="before")
    @classmethod
    def _counts_as_text(cls, v: Any) -> Any:
        """"[2, 3, 3]" or "2,3,3" as a list: a study grid's values are scalars, so counts come as text."""
        if isinstance(v, str):
            return [b.strip() for b in v.strip().strip("[]").split(",")]
        return v


class DataConfig(Section):
    dataset: Literal["cifar10", "cifar100", "synthetic"] = "cifar10"
    data_dir: str | None = None  # else $EDLAB_DATA_DIR, else ./data
    download: bool = True  # try torchvision's download when the data is not found
    val_size: int = Field(5000, ge=0)  # held out of the training set; drives every choice
    split_seed: int | None = None  # seed of the validation split; None = the run's seed. Stages inherit their source's
    train_subset: int | None = Field(None, ge=1)  # use only N training images (quick runs)
    augment: Literal["none", "crop-flip", "scale-rotate", "fancy"] = "crop-flip"
    cutout: int = Field(0, ge=0, le=32)  # side of the erased square, 0 = off
    mixup: float = Field(0.0, ge=0, le=100)  # Beta(alpha, alpha) mixing, 0 = off (alpha 100 is already lam=0.5)
    cutmix: float = Field(0.0, ge=0, le=100)  # CutMix: a partner's box of area ~Beta(alpha, alpha) pasted, 0 = off
    mix_switch_prob: float = Field(0.5, ge=0, le=1)  # mixup and cutmix both on: each batch is CutMix'd with this
    # probability, else mixed up (timm's mixup_switch_prob); unused unless both are on
    batch_size: int = Field(128, ge=1, le=65536)
    eval_batch_size: int = Field(1000, ge=1, le=65536)
    # crop-flip's knobs (airbench94: crop_pad 2, crop_fill reflect, flip alternate):
    crop_pad: int = Field(4, ge=0, le=16)  # crop-flip: largest shift in pixels (0: mirrors only; a teacher is cached)
    crop_fill: Literal["zeros", "reflect"] = "zeros"  # crop-flip: what the padded border holds
    flip: Literal["random", "alternate"] = "random"  # crop-flip: mirror at random each epoch, or each image
    # mirrored on alternate epochs (a seeded half mirrored on even epochs, the other half on odd ones)


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum (Adam uses betas)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decays, each in [0, 1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    no_decay_bn_bias: bool = True  # no weight decay on BN parameters and biases
    freeze_bn_weight: bool = False  # BN scales stay at their initial 1 (not trained), as in airbench94
    bn_bias_lr_scale: float = Field(1.0, gt=0, le=1000)  # BN biases train at lr x this (airbench94: 64); their
    # weight decay is divided by it, so the decay per step stays that of the other weights

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class SchedConfig(Section):
    name: Literal["none", "cosine", "onecycle", "step", "plateau", "linear"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, le=100000)  # linear warm-up from lr/25 (cosine, step, plateau)
    min_lr: float = Field(0.0, ge=0, le=100)  # floor of cosine (at most optim.lr)
    step_size: int = Field(30, ge=1)  # step: epochs between decays
    gamma: float = Field(0.1, gt=0, le=1)  # step: decay factor
    factor: float = Field(0.1, gt=0, lt=1)  # plateau: decay factor
    patience: int = Field(5, ge=0)  # plateau: epochs without val-loss improvement before decaying
    pct_start: float = Field(0.25, gt=0, lt=1)  # onecycle, linear: fraction of steps rising
    start_factor: float = Field(0.2, ge=0, le=1)  # linear: lr x this at the first step, rising to lr
    end_factor: float = Field(0.07, ge=0, le=1)  # linear: then falling to lr x this at the last step


class InitConfig(Section):
    """Initialisations applied to a fresh model (not to model.checkpoint) before training."""

    whiten: bool = False  # first conv = +-eigenvectors of the training images' patch covariance, weight frozen
    whiten_samples: int = Field(5000, ge=1)  # training images the patch covariance is estimated from
    whiten_bias_epochs: int = Field(3, ge=0)  # the whitening conv's bias trains this many epochs, then freezes
    dirac: bool = False  # 3x3 convs start as identities (dirac) on their first min(cin, cout) channels


class DistillConfig(Section):
    teacher: str | None = None  # teacher checkpoint; None = no distillation
    # T outside [0.05, 100] gave a non-finite loss at the first step (logits / T overflow, T^2 overflows)
    temperature: float = Field(4.0, ge=0.05, le=100)
    alpha: float = Field(0.9, ge=0, le=1)  # weight of the soft (teacher) term
    crop_pool: int = Field(0, ge=0, le=64)  # crop-flip: the teacher's logits cached for K fixed random crops per
    # image and their mirrors (drawn once from the seed); each step shows one of them. 0 = the teacher on the fly


class TrainConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    distill: DistillConfig = DistillConfig()
    init: InitConfig = InitConfig()
    epochs: int | float = Field(30, ge=0, le=100000)  # fractions allowed (9.9): the last epoch is partial
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm
    ema: float | None = Field(None, gt=0, lt=1)  # decay of an exponential moving average of the weights
    lookahead: int | None = Field(None, ge=1)  # every N steps: average the weights, reset the network to it
    lookahead_decay: float = Field(0.95, ge=0, lt=1)  # lookahead: per-step decay, ramped in as (step/total)^3
    tta: Literal["none", "flip", "flip-shift", "airbench"] = "none"  # test-time views averaged in val and test
    # evaluation; airbench = flip-shift's 6 views weighted as airbench94 does (1/4 plain and mirror, 1/8 shifted)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast; auto = bf16 where it is fast
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False  # torch.compile the model
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"  # reduce-overhead = CUDA graphs
    sync_bn: bool = False  # under torchrun on GPUs: batch statistics over the whole global batch
    device: str = "auto"  # auto = cuda if present, else cpu
    threads: int | None = Field(None, ge=1, le=1024)  # CPU threads for torch, at most the cores (None = the cores)
    seed: int = Field(0, ge=0, le=2**31 - 1)  # every random stream derives from it (torch takes < 2**64)
    early_stop: int | None = Field(None, ge=1)  # stop after N epochs without val-accuracy gain
    keep: Literal["last", "best"] = "last"  # model.ckpt = last epoch or best validation epoch
    # read the test split at the end (test_accuracy). A study with `test: chosen` sets it false for every
    # trial (validation drives everything) and tests only the points it chooses, once; a later stage
    # (prune, quantize) does not inherit it from its checkpoint
    final_test: bool = True
    nan_policy: Literal["stop", "skip"] = "stop"  # a non-finite loss stops the run, or skips the step
    tracker: Literal["tensorboard", "wandb", "mlflow"] = "tensorboard"  # + W&B or MLflow (TensorBoard always)
    name: str | None = None  # run name (default: model name)
    out: str | None = None  # run directory (default: runs/<name>-<timestamp>)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else safe_name(v)

    @model_validator(mode="after")
    def _crop_pool_views(self):
        """A crop pool caches the teacher's logits of plain crop-flip views: anything that changes the image
        after the crop (cutout, mixing) would make the cached logits answer for another image."""
        d = self.data
        if not self.distill.crop_pool:
            return self
        conflicts = [
            (d.augment != "crop-flip", "needs data.augment crop-flip"),
            (d.crop_pad == 0, "needs data.crop_pad of at least 1 (crop_pad 0 already caches image and mirror)"),
            (d.cutout > 0, "excludes data.cutout (the teacher would answer for the crop without the hole)"),
            (d.mixup > 0 or d.cutmix > 0, "excludes data.mixup and data.cutmix (the teacher must see the mixed "
                                          "image: it runs on the fly then)"),
        ]
        for bad, why in conflicts:
            if bad:
                raise ValueError(f"distill.crop_pool {why}")
        return self

    @model_validator(mode="after")
    def _min_lr_below_lr(self):
        if self.sched.min_lr > self.optim.lr:
            raise ValueError(f"sched.min_lr ({self.sched.min_lr}) must not exceed optim.lr ({self.optim.lr})")
        return self

    @field_validator("channels_last", mode="before")
    @classmethod
    def _on_off(cls, v):  # YAML reads a bare on/off as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError("choose auto, cpu, cuda or cuda:N")
        return v


def choices(section: type[BaseModel], field: str) -> list[str]:
    """The values a Literal config field accepts: what the command line offers for it (spelled once, here)."""
    return [str(v) for v in get_args(section.model_fields[field].annotation)]


DATASETS = tuple(choices(DataConfig, "dataset"))  # what every command's --dataset accepts


def _check_key(key: str) -> None:
    parts = key.split(".")
    if len(parts) > MAX_DEPTH or not all(parts):
        raise EdlabError(f"--set {key[:80]}: expected section.key=value")


def set_dotted(tree: dict, key: str, value: Any) -> None:
    _check_key(key)
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise EdlabError(f"--set {key}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_set_pairs(pairs: list[str]) -> dict[str, Any]:
    """['optim.lr=0.05', 'data.augment=none'] -> {'optim.lr': 0.05, ...}, values parsed as YAML scalars, the
    keys left flat: a recipe's or study's overrides mix a stage's options with its config keys, and a flag
    (``quantize.distill=false``) may share its name with a config section (``quantize.distill.crop_pool=4``)."""
    flat: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise EdlabError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        key = key.strip()
        _check_key(key)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise EdlabError(f"--set {key}: the value is nested too deeply") from None
        check_tree(value, f"--set {key}")
        flat[key] = value
    return flat


def parse_overrides(pairs: list[str]) -> dict:
    """['optim.lr=0.05', 'data.augment=none'] -> nested dict of config keys."""
    tree: dict = {}
    for key, value in parse_set_pairs(pairs).items():
        set_dotted(tree, key, value)
    return tree


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


MAX_YAML_BYTES = 1 << 20  # a config, recipe or study file is a few KB; a larger one is not one of them
MAX_NODES = 100_000  # values after expanding YAML aliases: a "billion laughs" file expands past this at once
MAX_DEPTH = 32  # nesting of mappings and lists: real files use 3 or 4 levels


def check_tree(data: Any, what: str) -> None:
    """Refuse a loaded document that is too deep or, with its aliases expanded, too large: a few lines
    of YAML aliases can stand for billions of values, which a later walk (merge, validation) would expand
    until memory runs out. Walks with a budget, so the check itself stays fast."""
    stack = [(data, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise EdlabError(f"{what} is too large (more than {MAX_NODES:,} values once its aliases are expanded)")
        if depth > MAX_DEPTH:
            raise EdlabError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node if isinstance(k, tuple))
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def read_text(path: str | Path, what: str = "file", limit: int = MAX_YAML_BYTES) -> str:
    """A small UTF-8 text file, or one clear EdlabError (missing, a folder, too big, not UTF-8)."""
    p = Path(path)
    if p.is_dir():
        raise EdlabError(f"{what} {p} is a folder, not a file")
    if not p.is_file():
        raise EdlabError(f"{what} not found: {p}")
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise EdlabError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if len(raw) > limit:
        raise EdlabError(f"{what} {p} is larger than {limit // 1024} KiB; it is not a {what}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdlabError(f"{what} {p} is not UTF-8 text (byte {e.start})") from None


def resolve_named(path: str, named_in: str | Path) -> str:
    """A relative path written inside a YAML file (a study's config, a recipe's checkpoint) read from where
    that file is, as YAML-including tools do, so a study runs from any working directory. Tried in order:
    beside the file, beside each of its ancestor folders (the repo's own studies/ and recipes/ name
    ``configs/x.yaml`` from the repo root), then the working directory (files written before this rule).
    The first that exists wins; a path that exists nowhere, or an absolute one, is returned as given (so an
    error names it as the file does). A path found where the working directory would find it too is returned
    as given, so that runs recorded with it (a study's fingerprint, pipeline.json) keep comparing equal."""
    p = Path(path)
    if p.is_absolute() or not path:
        return path
    here = p.resolve() if p.exists() else None
    folder = Path(named_in).resolve().parent
    for base in (folder, *folder.parents):
        candidate = base / p
        if candidate.exists():
            return path if here is not None and candidate.resolve() == here else str(candidate)
    return path


# keys whose values are paths, as a recipe stage, a study's set: or a train config names them
PATH_OPTIONS = ("config", "checkpoint", "teacher", "data-dir", "data_dir", "distill.teacher", "model.checkpoint",
                "data.data_dir")


def is_path_key(key: str) -> bool:
    """``train.config``, ``0.teacher``, ``distill.teacher``, ``prune.model.checkpoint``: a key naming a path."""
    return any(key == k or key.endswith("." + k) for k in PATH_OPTIONS)


def resolve_named_options(opts: dict, named_in: str | Path) -> dict:
    """``opts`` with the values of its path keys (and ``set: [k=v, ...]`` entries naming paths) resolved by
    :func:`resolve_named` against the file ``named_in`` that holds them."""
    out = {}
    for k, v in opts.items():
        if isinstance(v, str) and is_path_key(str(k)):
            v = resolve_named(v, named_in)
        elif k == "set" and isinstance(v, str):
            v = _resolve_set(v, named_in)
        elif k == "set" and isinstance(v, list):
            v = [_resolve_set(x, named_in) if isinstance(x, str) else x for x in v]
        out[k] = v
    return out


def _resolve_set(pair: str, named_in: str | Path) -> str:
    key, eq, value = pair.partition("=")
    return f"{key}={resolve_named(value, named_in)}" if eq and is_path_key(key.strip()) else pair


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    text = read_text(p, "config file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise EdlabError(f"config {p} is not valid YAML{where}") from None
    except RecursionError:
        raise EdlabError(f"config {p} is nested too deeply") from None
    if not isinstance(data, dict):
        raise EdlabError(f"config {p} must be a mapping of keys, got {type(data).__name__}")
    check_tree(data, f"config {p}")
    return data


def _describe(err: ValidationError, cls: type[BaseModel]) -> str:
    e = err.errors()[0]
    key = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        section: Any = cls
        for part in e["loc"][:-1]:
            ann = section.model_fields[str(part)].annotation
            section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if section is None:
                break
        valid = ", ".join(section.model_fields) if section else ""
        return f"unknown config key '{key}'" + (f" (valid here: {valid})" if valid else "") + \
            _did_you_mean(e["loc"], section)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "literal_error":
        msg = msg.replace("Input should be", "choose")
    if not key:  # a rule across keys (model validator): its message names them
        return f"config: {msg}"
    shown = repr(e.get("input"))
    return f"config key '{key}': {msg} (got {shown[:80] + '...' if len(shown) > 80 else shown})"


def _did_you_mean(loc: tuple, section: Any) -> str:
    """'lr' at the top level -> did you mean optim.lr? (a key of a section), else the closest valid key."""
    import difflib

    leaf = str(loc[-1])
    if len(loc) == 1:
        homes = [f"{name}.{leaf}" for name, f in TrainConfig.model_fields.items()
                 if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
                 and leaf in f.annotation.model_fields]
        if homes:
            return f"; did you mean {' or '.join(homes)}?"
    if section is not None:
        close = difflib.get_close_matches(leaf, list(section.model_fields), n=1)
        if close:
            return f"; did you mean {'.'.join(str(x) for x in loc[:-1]) + '.' if len(loc) > 1 else ''}{close[0]}?"
    return ""


def build(cls: type[BaseModel], *layers: dict) -> Any:
    """Merge config layers (file, flags, --set) in order and validate, one line on error."""
    tree: dict = {}
    for layer in layers:
        tree = merge(tree, layer)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise EdlabError(_describe(err, cls)) from None


def load_train_config(path: str | None = None, flags: dict | None = None, sets: list[str] | None = None):
    file_layer = read_yaml(path) if path else {}
    return build(TrainConfig, file_layer, flags or {}, parse_overrides(sets or []))


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
