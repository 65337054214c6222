"""The run directory every command writes: config, per-epoch metrics, summary, TensorBoard, checkpoints.

Layout of ``runs/<name>-<timestamp>/``::

    config.yaml      fully resolved config            metrics.jsonl  one JSON line per epoch
    summary.json     final figures + reproduce cmd     tb/            TensorBoard event files
    model.ckpt       final model (edlab checkpoint)    resume.pt      state to continue a killed run
    tracker.json     id of the W&B / MLflow run (only with such a tracker), so a resumed run continues it
    teacher-table.pt the teacher's cached logits while a distillation trains (read back on resume)

JSON files are replaced atomically, so a crash never leaves a half-written summary.

Trackers: TensorBoard always; with ``tracker: wandb`` or ``tracker: mlflow`` in the config the same
metrics also go to Weights & Biases (``WANDB_MODE=offline`` works without an account) or MLflow (local
store ./mlruns unless MLFLOW_TRACKING_URI says otherwise). The tracker starts when the run writes its
config.yaml (every command does that before loading data), so a missing package fails in one line before
any training; the packages are imported only then.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .errors import EdlabError
from .files import atomic_write_bytes


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than produce an invalid file."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(data), indent=2) + "\n").encode())


def check_out_path(path: Path, what: str = "--out") -> None:
    """An output folder must be a folder or not exist yet: a file, a dangling link, or a file on the way
    to it is one clear line (before anything runs), not an OSError traceback at mkdir."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise EdlabError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist")
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise EdlabError(f"{what} {path}: {p} is a file, not a folder" if p != path else
                             f"{what} {path} is a file, not a folder")


def command_line() -> str:
    return shlex.join(["edlab", *sys.argv[1:]]) if sys.argv and "edlab" in sys.argv[0] else shlex.join(sys.argv)


def _metric_items(row: dict) -> dict[str, float]:
    """Numeric, finite values except the step, named like 'train/loss' so dashboards group them."""
    return {k.replace("_", "/", 1): float(v) for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "epoch" and math.isfinite(v)}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _import(name: str, extra: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise EdlabError(f"tracker '{extra}' needs the {extra} package: pip install edlab[{extra}]") from None


class WandbTracker:
    """Weights & Biases: one W&B run per run directory, its files under <run>/wandb/."""

    def __init__(self, run_dir: Path, config: dict, resume_id: str | None):
        wandb = _import("wandb", "wandb")
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "edlab"), name=run_dir.name,
                               dir=str(run_dir), config=config, id=resume_id, resume="allow" if resume_id else None)
        self.id = self._run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """MLflow through its client (no global 'active run' to leak between stages of a pipeline)."""

    def __init__(self, run_dir: Path, config: dict, resume_id: str | None):
        mlflow = _import("mlflow", "mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:  # MLflow >= 3.x refuses its file store unless asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        if resume_id:
            self.id = resume_id
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "edlab")
            exp = self._client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(name)
            self.id = self._client.create_run(exp_id, run_name=run_dir.name).info.run_id
            for k, v in flatten(config).items():
                self._client.log_param(self.id, k, v)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self._client.log_metric(self.id, k, v, step=step)

    def close(self) -> None:
        self._client.set_terminated(self.id)


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}  # tensorboard: always on, built in


def _link_latest(path: Path) -> None:
    """Point ``<root>/latest`` at the newest run folder, so examples can say runs/latest/model.ckpt
    (a glob like runs/resnet20-*/model.ckpt breaks once two runs exist). Replaced atomically; where
    links cannot be made, or a real folder is named latest, nothing happens."""
    link, tmp = path.parent / "latest", path.parent / f".latest-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path.name, target_is_directory=True)
        if link.is_symlink() or not link.exists():
            os.replace(tmp, link)
    except OSError:
        pass
    finally:
        if tmp.is_symlink():
            tmp.unlink(missing_ok=True)


class Run:
    """A run directory. ``Run.create`` makes a new unique one; ``Run.open`` an existing one (resume)."""

    def __init__(self, path: Path):
        self.path = path
        self._tb = None
        self._tracker: WandbTracker | MlflowTracker | None = None

    @classmethod
    def create(cls, name: str, out: str | None = None, root: str = "runs") -> Run:
        if out:
            path = Path(out)
            check_out_path(path)
            busy = EdlabError(f"run directory {path} exists and is not empty (use --resume to continue it, or "
                              f"choose another --out)")
            if path.exists() and any(path.iterdir()):
                raise busy
            path.mkdir(parents=True, exist_ok=True)
            try:  # claim the folder: of two runs started together with the same --out, exactly one gets it
                os.close(os.open(path / ".edlab-run", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                raise busy from None
            return cls(path)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        Path(root).mkdir(parents=True, exist_ok=True)
        for i in range(1000):  # two runs started in the same second get distinct folders
            path = Path(root) / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            _link_latest(path)
            return cls(path)
        raise EdlabError(f"could not create a run directory under {root}")

    @classmethod
    def open(cls, path: str | Path) -> Run:
        p = Path(path)
        if not p.is_dir():
            raise EdlabError(f"run directory not found: {p}")
        return cls(p)

    def discard(self) -> None:
        """Undo a run that failed before its first epoch (no data, bad checkpoint): remove the files it
        wrote so far and the folder if that leaves it empty, so --out is free for the same command again."""
        self.close()
        for name in ("config.yaml", "tracker.json", ".edlab-run"):
            self.file(name).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:  # something else is in it (a tracker's files): leave it
            pass

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        if name == "config.yaml":
            self.start_tracker(yaml.safe_load(text) or {})
        atomic_write_bytes(self.file(name), text.encode())

    def start_tracker(self, config: dict) -> None:
        """Open the W&B or MLflow run named by ``config['tracker']`` (nothing more for tensorboard)."""
        name = config.get("tracker") or "tensorboard"
        if name == "tensorboard" or self._tracker is not None:
            return
        if name not in TRACKERS:
            raise EdlabError(f"unknown tracker '{name}' (choices: tensorboard, {', '.join(TRACKERS)})")
        saved = self.file("tracker.json")
        prev = json.loads(saved.read_text()) if saved.exists() else {}
        try:
            self._tracker = TRACKERS[name](self.path, config, prev.get("id") if prev.get("tracker") == name else None)
        except EdlabError:
            raise
        except Exception as e:  # e.g. wandb online without a login: one line, not the package's traceback
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise EdlabError(f"tracker '{name}' could not start: {first}") from None
        write_json(saved, {"tracker": name, "id": self._tracker.id})

    def log_metrics(self, row: dict) -> None:
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tb = self.tensorboard()
        if tb is not None:
            step = row.get("epoch", 0)
            for k, v in row.items():
                if isinstance(v, int | float) and k != "epoch" and math.isfinite(v):
                    tb.add_scalar(k.replace("_", "/", 1), v, step)
            tb.flush()
        if self._tracker is not None:
            self._tracker.log(_metric_items(row), int(row.get("epoch", 0)))

    def metrics(self) -> list[dict]:
        p = self.file("metrics.jsonl")
        if not p.exists():
            return []
        rows = []
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: ignore it
                pass
        return rows

    def rewrite_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl by these rows (a resumed run redoes what its resume state lacks)."""
        atomic_write_bytes(self.file("metrics.jsonl"), "".join(json.dumps(_clean(r)) + "\n" for r in rows).encode())

    def write_summary(self, summary: dict) -> None:
        write_json(self.file("summary.json"), summary)

    def tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return None
            self._tb = SummaryWriter(str(self.file("tb")))
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


RUN_MODEL_FILES = ("model.ckpt", "model.int8.onnx", "model.onnx", "model.pack")  # what a run folder holds


def resolve_model_path(target: str | Path) -> str:
    """A run folder -> the model file in it (a stage writes model.ckpt, the int8 stage model.int8.onnx);
    anything else unchanged. So ``edlab score runs/latest`` and ``edlab.load_model("runs/latest")`` work."""
    target = str(target)
    p = Path(target)
    if not p.is_dir():
        return target
    for name in RUN_MODEL_FILES:
        if (p / name).is_file():
            return str(p / name)
    raise EdlabError(f"{target} is a folder without a model file ({', '.join(RUN_MODEL_FILES)}): give a run "
                     f"folder or a checkpoint")
