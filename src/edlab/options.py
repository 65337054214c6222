"""The options of the train, prune and quantize commands, each spelled once: name, type, default, choices,
limits and help.

Everything else derives from these models: the command line's flags (edlab.cli._common.options_from), the
library functions' keyword checks (``PruneOptions.of(kw)``), a recipe stage's options (edlab.stages) and the
option -> config-key tables (``TRAIN_FLAGS``, ``PRUNE_FLAGS``). An option that sets a training-config key says
which (``config="data.batch_size"``) and takes its type, choices and limits from edlab.config, where they are
written; the command adds nothing but the name. tests/test_options.py checks that each command accepts
exactly its model's options.

Torch-free (pydantic only), so that ``edlab --help`` stays fast.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .config import TrainConfig, set_dotted
from .errors import EdlabError


def option(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (), config: str | None = None,
           negatable: bool = False, **limits) -> Any:
    """A field of an options model. ``flags``: its command-line spellings (default ``--name-with-dashes``);
    ``config``: the training-config key it sets (its type and limits are the config's); ``negatable``: a
    boolean that defaults to true gets --name/--no-name."""
    extra = {"flags": flags, "config": config, "negatable": negatable}
    return Field(default, description=help, json_schema_extra=extra, **limits)


def meta(field) -> dict:
    """The option() metadata of a model field."""
    return field.json_schema_extra or {}


def flags_of(name: str, field) -> tuple[str, ...]:
    return meta(field).get("flags") or (f"--{name.replace('_', '-')}",)


def config_field(key: str):
    """The FieldInfo of a dotted training-config key ("data.batch_size"): where its type and limits live."""
    model: Any = TrainConfig
    *sections, leaf = key.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf]


@cache
def _config_adapter(key: str) -> TypeAdapter:
    field = config_field(key)  # its limits (ge, le, ...) travel in the FieldInfo
    return TypeAdapter(Annotated[field.annotation, field], config=ConfigDict(allow_inf_nan=False))


def literal_choices(annotation: Any) -> tuple | None:
    """("a", "b") for Literal["a", "b"] (or an Optional of it); None for any other type."""
    if getattr(annotation, "__origin__", None) is Literal:
        return get_args(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    return literal_choices(args[0]) if len(args) == 1 else None


def takes(model: type[BaseModel]):
    """Show a function's ``**options`` as its options model's fields in its signature, with their defaults, so
    that help() and inspect.signature() list them (the model stays their one spelling)."""
    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=f.annotation,
                                   default=inspect.Parameter.empty if f.is_required() else f.default)
                 for name, f in model.model_fields.items() if name not in sig.parameters]
        fn.__signature__ = sig.replace(parameters=own + extra)
        return fn
    return decorate


class RuleAcross(ValueError):
    """A rule across options (something to prune, ps + pu < 1, qat's bits): it holds for a call, not for a
    recipe stage checked before a study has chosen its point (``Options.of(..., partial=True)``)."""


class Options(BaseModel):
    """An options model: unknown options and wrong values are one line naming the flag."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @classmethod
    def of(cls, values: dict | None = None, partial: bool = False, **more):
        """Validate options given by keyword (None = the default, as an absent flag): one EdlabError line.
        ``partial``: each option alone, the rules across them left for the call (a study's probe)."""
        given = {k: v for k, v in {**(values or {}), **more}.items() if v is not None}
        try:
            return cls.model_validate(given)
        except ValidationError as err:
            if partial and all(isinstance(e.get("ctx", {}).get("error"), RuleAcross) for e in err.errors()):
                return cls.model_construct(**given)
            raise EdlabError(_describe(err, cls)) from None

    @classmethod
    def config_flags(cls) -> dict[str, str]:
        """Option name -> the training-config key it sets, for the options that set one."""
        return {name: meta(f)["config"] for name, f in cls.model_fields.items() if meta(f).get("config")}

    @model_validator(mode="after")
    def _config_values(self):
        """A config-setting option is checked now against its config key (type, choices, limits), so that a bad
        value is refused before a checkpoint or the data is loaded."""
        for name, key in self.config_flags().items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                self.__dict__[name] = _config_adapter(key).validate_python(value)
            except ValidationError as err:
                e = err.errors()[0]
                msg = e["msg"].replace("Input should be", "choose" if e["type"] == "literal_error" else "must be")
                raise ValueError(f"{flags_of(name, type(self).model_fields[name])[0]} (config key '{key}'): {msg} "
                                 f"(got {value!r:.80})") from None
        return self

    def config_tree(self) -> dict:
        """The config-setting options that were given, as a config tree: {"lr": 0.1} -> {"optim": {"lr": 0.1}}."""
        tree: dict = {}
        for name, key in self.config_flags().items():
            if getattr(self, name) is not None:
                set_dotted(tree, key, getattr(self, name))
        return tree


def _describe(err: ValidationError, cls: type[BaseModel]) -> str:
    e = err.errors()[0]
    name = str(e["loc"][0]) if e["loc"] else ""
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        valid = ", ".join(flags_of(n, f)[0] for n, f in cls.model_fields.items())
        return f"unknown option '{name}' (options: {valid})"
    flag = flags_of(name, cls.model_fields[name])[0] if name in cls.model_fields else ""
    if not name or msg.startswith(flag):  # a rule of its own: its message names the options
        return msg
    if e["type"] == "literal_error":
        choose = msg.replace("Input should be", "choose")
        return f"unknown {flag[2:].replace('-', ' ')} {e.get('input')!r} ({choose})"
    if e["type"] == "missing":
        return f"{flag} is required"
    return f"{flag}: {msg.replace('Input should be', 'must be')} (got {e.get('input')!r:.80})"


THREADS_HELP = "CPU threads (default: all cores; 1 on a busy shared machine)."


# --- options that set training-config keys (type, choices and limits: edlab.config) ---------------------------

class DistillOptions(Options):
    teacher: Any = option(help="Distil from this checkpoint's logits, computed on the student's augmented batches "
                          "(or cached once: distill.crop_pool).", config="distill.teacher")
    temperature: Any = option(help="Distillation: softmax temperature T (default 4).", config="distill.temperature")
    alpha: Any = option(help="Distillation: weight of the teacher's soft term (default 0.9; the label loss gets "
                        "1 - alpha).", config="distill.alpha")


class FinetuneOptions(DistillOptions):
    """The fine-tuning run's data and machine, shared by prune and quantize (default: the checkpoint's)."""

    dataset: Any = option(help="Default: the checkpoint's.", config="data.dataset")
    data_dir: Any = option(help="Folder holding cifar-10-batches-py/ (else $EDLAB_DATA_DIR, else ./data).",
                           config="data.data_dir")
    train_subset: Any = option(help="Fine-tune on only N training images.", config="data.train_subset")
    threads: Any = option(help=THREADS_HELP, config="threads")


class TrainOptions(DistillOptions):
    """edlab train's named options; every other config key is given with --set KEY=VALUE."""

    model: Any = option(help="Registered model name (see `edlab models`).", config="model.name")
    dataset: Any = option(config="data.dataset")
    data_dir: Any = option(help="Folder holding cifar-10-batches-py/ (else $EDLAB_DATA_DIR, else ./data).",
                           config="data.data_dir")
    train_subset: Any = option(help="Train on only N images (quick runs).", config="data.train_subset")
    epochs: Any = option(help="Epochs; a fraction (9.9, 0.5) ends with a partial epoch.", config="epochs")
    batch_size: Any = option(config="data.batch_size")
    optimizer: Any = option(config="optim.name")
    lr: Any = option(config="optim.lr")
    weight_decay: Any = option(config="optim.weight_decay")
    scheduler: Any = option(config="sched.name")
    augment: Any = option(config="data.augment")
    seed: Any = option(config="seed")
    device: Any = option(help="auto (default), cpu, cuda, cuda:N.", config="device")
    precision: Any = option(config="precision")
    threads: Any = option(help=THREADS_HELP, config="threads")
    tracker: Any = option(help="Also log to W&B or MLflow (TensorBoard always); needs pip install edlab[wandb] / "
                          "edlab[mlflow].", config="tracker")
    out: Any = option(help="Run directory (default runs/<name>-<timestamp>).", config="out")


class LrFindOptions(Options):
    """edlab lr-find: the range test, then the training config's options it reads."""

    steps: int = option(100, "Batches of the test, one lr each.", ge=2)
    start: float = option(1e-6, "First lr.", gt=0)
    end: float = option(10.0, "Last lr.", gt=0)
    plot_path: str | None = option("lr_find.png", "Loss-vs-lr plot (PNG).", flags=("--plot",))
    model: Any = option(help="Registered model name (see `edlab models`).", config="model.name")
    dataset: Any = option(config="data.dataset")
    data_dir: Any = option(help="Folder holding cifar-10-batches-py/ (else $EDLAB_DATA_DIR, else ./data).",
                           config="data.data_dir")
    batch_size: Any = option(config="data.batch_size")
    optimizer: Any = option(config="optim.name")
    train_subset: Any = option(help="Draw batches from only N training images.", config="data.train_subset")
    threads: Any = option(help=THREADS_HELP, config="threads")

    @model_validator(mode="after")
    def _range(self):
        if not self.start < self.end:
            raise RuleAcross(f"--start must be below --end (got {self.start}, {self.end})")
        return self


# --- edlab prune ----------------------------------------------------------------------------------------------

Importance = Literal["l1", "l2", "bn", "taylor"]
PruneTarget = Literal["params", "macs"]
PruneSchedule = Literal["linear", "cubic"]
PruneScope = Literal["global", "layer"]


class PruneRecipe(Options):
    """The seed's strategy as one stage: structured steps, then unstructured steps, fine-tuning after each.
    ``structured`` is the total fraction of the dense params (or MACs, per ``target_kind``) removed;
    ``unstructured`` the total fraction of the dense params zeroed (pu)."""

    structured: float = option(0.0, "Total fraction of the dense params (or MACs, --target) to remove by deleting "
                               "channels.")
    unstructured: float = option(0.0, "Total fraction of the dense params to set to zero (the score's pu).")
    steps: int = option(1, "Pruning steps per kind, fine-tuning after each.", ge=1)
    finetune_epochs: int = option(5, "Fine-tuning epochs after each step (--epochs: the same, as in train and "
                                  "quantize).", flags=("--finetune-epochs", "--epochs"), ge=0)
    schedule: PruneSchedule = option("linear", "Targets of the steps (cubic: AGP).")
    importance: Importance = option("l1", "Channel importance.")
    global_pruning: bool = option(False, "Rank channels of all layers together.", flags=("--global",))
    target_kind: PruneTarget = option("params", "What --structured is a fraction of.", flags=("--target",),
                                      serialization_alias="target")  # (recorded as "target" in files)
    keep: tuple[str, ...] = option((), "Comma-separated layers left untouched, e.g. fc,conv1 (the classifier's "
                                   "outputs are always kept).")
    scope: PruneScope = option("global", "Unstructured ranking: over all layers or per layer.")
    round_to: int | None = option(None, "Keep channel counts multiples of N (fast kernels like 8).", ge=1)
    distill: bool = option(False, "Fine-tune with distillation from the unpruned model (or give --teacher CKPT).")
    from_scratch: bool = option(False, "Baseline: train the pruned architecture from random init.")
    scratch_epochs: int | None = option(None, "Epochs of the --from-scratch training (default --finetune-epochs).",
                                        ge=0)
    calib_batches: int = option(8, "Training batches for taylor.", ge=1)

    def record(self) -> dict:
        """The recipe as the run's files record it (summary.json, the checkpoint's metadata)."""
        return self.model_dump(mode="json", by_alias=True)

    @field_validator("keep", mode="before")
    @classmethod
    def _keep_as_text(cls, v: Any) -> Any:
        if isinstance(v, str):  # the command line's "fc,conv1"
            return tuple(k.strip() for k in v.split(",") if k.strip())
        return v

    @field_validator("structured", "unstructured")
    @classmethod
    def _fraction(cls, v: float, info) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"--{info.field_name} must be a fraction in [0, 1), got {v!r}")
        return v

    @model_validator(mode="after")
    def _something_to_prune(self):
        if self.structured == 0 and self.unstructured == 0:
            raise RuleAcross("nothing to prune: give --structured and/or --unstructured (fractions in [0, 1))")
        if self.target_kind == "params" and self.structured + self.unstructured >= 1:
            raise RuleAcross(f"--structured + --unstructured = {self.structured + self.unstructured:g} must be "
                             f"< 1: both are fractions of the dense model's parameters (ps + pu < 1)")
        return self


class PruneOptions(PruneRecipe, FinetuneOptions):
    """edlab prune: the recipe, then the fine-tuning run's options."""

    batch_size: Any = option(config="data.batch_size")
    lr: Any = option(help="Fine-tuning lr (default: 1/10 of the checkpoint's training lr).", config="optim.lr")
    device: Any = option(help="auto (default), cpu, cuda, cuda:N.", config="device")
    precision: Any = option(config="precision")
    seed: Any = option(config="seed")

    def recipe(self) -> PruneRecipe:
        return PruneRecipe(**{k: getattr(self, k) for k in PruneRecipe.model_fields})


# --- edlab quantize -------------------------------------------------------------------------------------------

Method = Literal["fp16", "bf16", "binaryconnect", "qat", "int8"]


class QuantizeOptions(FinetuneOptions):
    """edlab quantize: the method and its bits, then the fine-tuning run's options."""

    method: Method = option(..., "fp16/bf16: cast; binaryconnect: binary weights, fine-tuned; qat: k-bit weights "
                            "and activations (LSQ), fine-tuned; int8: ONNX Runtime static int8.")
    bits_w: int = option(8, "qat: weight bits (2-16).")
    bits_a: int | None = option(None, "qat: activation bits (2-16, 32 = float); default: --bits-w.")
    first_last_bits: int | None = option(None, "qat: quantize the first/last layers at this many bits instead of "
                                         "keeping them float.")
    layer_bits: str | None = option(None, "qat: per-layer bits, first matching rule wins: 'first=8,last=8,"
                                    "layers.2.*=3/4' (PATTERN=N: weights and activations; W/A apart; A=32: float "
                                    "activations; 32: float layer). Patterns are globs over the layer names of "
                                    "`edlab score`.")
    fold: bool = option(False, "Fold the BNs into the convs before them (after qat/binaryconnect fine-tuning; "
                        "before fp16/bf16/int8): the tested, scored and saved model is the deployment form.",
                        flags=("--fold-bn",))
    epochs: Any = option(help="Fine-tuning epochs (binaryconnect, qat; default 5).", config="epochs")
    keep_first_last: bool = option(True, "Leave the first and last layers in full precision.", negatable=True)
    scale: bool = option(False, "binaryconnect: per-channel scale alpha = mean |w| (XNOR-style).")
    stochastic: bool = option(False, "binaryconnect: stochastic binarization during training.")
    calib_images: int = option(1024, "int8: training images for calibration (qat: first 256 set the activation "
                               "steps).", ge=1)
    distill: bool = option(False, "binaryconnect/qat: fine-tune with distillation from the float source model (or "
                           "give --teacher CKPT).")

    @model_validator(mode="after")
    def _bits(self):
        if self.method == "qat":
            for flag, bits in (("--bits-w", self.bits_w), ("--bits-a", self.bits_a),
                               ("--first-last-bits", self.first_last_bits)):
                if bits is not None and not (2 <= bits <= 16 or (flag == "--bits-a" and bits == 32)):
                    raise RuleAcross(f"{flag} must be an integer from 2 to 16 (use binaryconnect for 1-bit "
                                     f"weights), got {bits!r}")
        elif self.layer_bits:
            raise RuleAcross(f"--layer-bits is a qat option (method {self.method} has one bit-width)")
        return self

    @property
    def activation_bits(self) -> int | None:
        """qat's activation bits: --bits-a, else --bits-w; None = float (32)."""
        bits = self.bits_w if self.bits_a is None else self.bits_a
        return None if bits == 32 else bits


METHODS: tuple[str, ...] = get_args(Method)
IMPORTANCES: tuple[str, ...] = get_args(Importance)
TARGETS: tuple[str, ...] = get_args(PruneTarget)
SCHEDULES: tuple[str, ...] = get_args(PruneSchedule)
SCOPES: tuple[str, ...] = get_args(PruneScope)
DISTILL_FLAGS = DistillOptions.config_flags()
TRAIN_FLAGS = TrainOptions.config_flags()
PRUNE_FLAGS = PruneOptions.config_flags()
