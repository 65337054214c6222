"""The resume file: everything ``fit`` needs to continue after its last finished epoch, checksummed.

Format (read by every later version: tests/test_compat.py resumes a file written before this module existed):
``RESUME_MAGIC``, the sha256 of the rest (32 bytes), then ``torch.save`` of {model, optimizer, sched, scaler,
ema, lookahead, state}. Files from before the checksum (a bare torch.save zip) still load.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import EdlabError
from .files import atomic_write_bytes

if TYPE_CHECKING:
    from .optim import LRSchedule
    from .tricks import EMA, Lookahead


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

    def kept_val(self, keep: str) -> float | None:
        """The val accuracy of the weights a run keeps (``keep``: best or last); None without a validation
        split. A stage that reloads best.ckpt must report its val, not the last epoch's: a study ranks by it."""
        if keep == "best":
            return self.best_val if self.best_epoch > 0 else None
        return self.history[-1].get("val_accuracy") if self.history else None


RESUME_MAGIC = b"edlab-resume/1\n"  # then the sha256 of the rest (32 bytes), then torch.save's bytes


def save_resume(path, model, opt, sched: LRSchedule, state: FitState, scaler, ema: EMA | None = None,
                look: Lookahead | None = None) -> None:
    """torch.save's bytes behind a sha256: a flipped byte must not resume silently with other weights."""
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


def load_resume(path, model, opt, sched: LRSchedule, scaler, ema: EMA | None = None,
                epochs: int | None = None, look: Lookahead | None = None) -> FitState:
    """Restore ``fit``'s objects in place from a resume file and return its FitState; a corrupt or malformed
    file is refused in one line (start again without --resume), never a traceback or silently other weights."""
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

