"""Kill-test harness: run an edlab command line in a subprocess, SIGKILL it at a chosen point, run it again
until it finishes, and fingerprint what it leaves so that it can be compared with an uninterrupted run.

Two ways to kill (a ``KillPoint``):

* ``write=N``: the N-th atomic file write of the process writes half its bytes to its temp file and the
  process SIGKILLs itself (``EDLAB_FAULT=kill-in-write:N``, see ``edlab.checkpoint``): the worst moment
  for a crash, hit exactly. An N past the process's last write means "no kill" (it finishes).
* ``after=S``: SIGKILL from outside after S seconds (mid-epoch, mid-stage, anywhere).

Generic on purpose: any command that continues when re-run (``edlab train --resume``, ``edlab run RECIPE
--out D``, a sweep) can be driven by :func:`run_until_done` and compared with :func:`fingerprint`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Keys that legitimately differ between an interrupted and an uninterrupted run: wall-clock figures, the
# command line (a continued stage gets --resume) and a checkpoint's header digest (it covers the absolute
# paths in the header; the header itself is compared, paths made relative, and so is the weights digest).
VOLATILE = {"seconds", "train_seconds", "wall_seconds_this_process", "images_per_s", "command", "argv", "header_sha256"}


@dataclass(frozen=True)
class KillPoint:
    write: int | None = None  # SIGKILL inside this atomic write (1-based, counted per process)
    after: float | None = None  # SIGKILL after this many seconds

    def __str__(self) -> str:
        return f"write#{self.write}" if self.write is not None else f"{self.after:.2f}s"


def random_kill_points(n: int, seed: int, max_write: int, max_seconds: float) -> list[KillPoint]:
    """``n`` kill points from a seeded RNG: alternately inside a random write and after a random delay."""
    rng = random.Random(seed)
    return [KillPoint(write=rng.randint(1, max_write)) if i % 2 == 0 else
            KillPoint(after=rng.uniform(0.5, max_seconds)) for i in range(n)]


def env(fault: str | None = None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("EDLAB_FAULT", None)
    if fault:
        e["EDLAB_FAULT"] = fault
    return e


def run_edlab(args: list, cwd: str | Path | None = None, kill: KillPoint | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m edlab ARGS`` in a subprocess (1 thread), killed at ``kill``; returncode -9 if killed."""
    cmd = [sys.executable, "-m", "edlab", *map(str, args)]
    fault = f"kill-in-write:{kill.write}" if kill is not None and kill.write is not None else None
    p = subprocess.Popen(cmd, cwd=cwd, env=env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = kill.after if kill is not None and kill.after is not None else timeout
    try:
        out, err = p.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        if kill is None or kill.after is None:
            p.kill()
            raise
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_until_done(first: list, again: list | Callable[[], list], kills: list[KillPoint], cwd=None) -> list[str]:
    """Run ``first`` killed at kills[0], then ``again`` (the continue command, or a function returning it,
    e.g. ``first`` while a killed run had not yet created its folder) killed at each next point, then
    ``again`` without a kill. Each run must either die by SIGKILL or exit 0. Returns a log line per run,
    e.g. 'write#3: killed' or '2.10s: finished' (a kill point after the end of the work)."""
    log = []
    for i, k in enumerate(kills):
        args = first if i == 0 else again() if callable(again) else again
        r = run_edlab(args, cwd, k)
        assert r.returncode in (0, -signal.SIGKILL), f"run {i} ({k}) failed ({r.returncode}):\n{r.stderr[-3000:]}"
        log.append(f"{k}: {'finished' if r.returncode == 0 else 'killed'}")
    r = run_edlab((again() if callable(again) else again) if kills else first, cwd)
    assert r.returncode == 0, f"final run failed ({r.returncode}):\n{r.stderr[-3000:]}"
    log.append("final: finished")
    return log


def _normalise(v, root: str):
    if isinstance(v, dict):
        return {k: _normalise(x, root) for k, x in v.items() if k not in VOLATILE}
    if isinstance(v, list):
        return [_normalise(x, root) for x in v]
    if isinstance(v, str):
        return v.replace(root, "<out>")
    return v


def fingerprint(root: str | Path) -> dict:
    """What a run (or pipeline) folder holds that must not depend on interruptions: every JSON/JSONL file
    (without wall-clock keys; paths relative to ``root``) and every checkpoint's header and weights digest.
    Folders of interrupted attempts (``*.interrupted-K``), TensorBoard files and left-over temp files of
    killed writes (``.NAME.XXXX.tmp``, never read) are ignored."""
    from edlab.checkpoint import read_checkpoint

    root = Path(root)
    out: dict = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(".interrupted-" in part or part == "tb" for part in rel.parts) \
                or p.name.startswith("."):
            continue
        if p.suffix == ".json":
            out[str(rel)] = _normalise(json.loads(p.read_text()), str(root))
        elif p.suffix == ".jsonl":
            out[str(rel)] = [_normalise(json.loads(line), str(root)) for line in p.read_text().splitlines()]
        elif p.suffix == ".ckpt":
            header, _ = read_checkpoint(p)  # verifies the digest: a torn checkpoint fails here
            out[str(rel)] = _normalise(header, str(root))
    return out
