"""Atomic file writes: what checkpoints, run folders (edlab.runs) and resume files are written with.

A leaf module (standard library only) so that every writer imports it without importing each other.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


# Fault injection for the reliability tests (tests/test_resume_after_kill.py): EDLAB_FAULT=kill-in-write:N makes the
# N-th atomic write of this process write half its bytes to the temp file and then SIGKILL the process, the
# worst moment for a crash. Unset (always, outside tests) it costs one dict lookup per write.
_WRITES = 0


def _fault_point(f, data: bytes) -> None:
    global _WRITES
    spec = os.environ.get("EDLAB_FAULT", "")
    if not spec.startswith("kill-in-write:"):
        return
    _WRITES += 1
    if _WRITES == int(spec.split(":")[1]):
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def user_cache(*parts: str) -> Path:
    """A folder under the user's cache, ``$XDG_CACHE_HOME`` (``~/.cache`` by default) / edlab / ``parts``: where
    edlab keeps what later processes may reuse (md5 verdicts, teacher tables)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser().joinpath("edlab", *parts)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target: a reader (or a crash)
    sees the old file or the new one, never a mix. Concurrent writers each use their own temp file, so
    the last rename wins and the file is always one writer's complete bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            _fault_point(f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
