"""The run directory every command writes: config, per-epoch metrics, summary, TensorBoard, checkpoints.

Layout of ``runs/<name>-<timestamp>/``::

    config.yaml      fully resolved config            metrics.jsonl  one JSON line per epoch
    summary.json     final figures + reproduce cmd     tb/            TensorBoard event files
    model.ckpt       final model (edlab checkpoint)    resume.pt      state to continue a killed run

JSON files are replaced atomically, so a crash never leaves a half-written summary.
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

from .checkpoint import atomic_write_bytes
from .errors import EdlabError


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


def command_line() -> str:
    return shlex.join(["edlab", *sys.argv[1:]]) if sys.argv and "edlab" in sys.argv[0] else shlex.join(sys.argv)


class Run:
    """A run directory. ``Run.create`` makes a new unique one; ``Run.open`` an existing one (resume)."""

    def __init__(self, path: Path):
        self.path = path
        self._tb = None

    @classmethod
    def create(cls, name: str, out: str | None = None, root: str = "runs") -> Run:
        if out:
            path = Path(out)
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
                return cls(path)
            except FileExistsError:
                continue
        raise EdlabError(f"could not create a run directory under {root}")

    @classmethod
    def open(cls, path: str | Path) -> Run:
        p = Path(path)
        if not p.is_dir():
            raise EdlabError(f"run directory not found: {p}")
        return cls(p)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.file(name), text.encode())

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
