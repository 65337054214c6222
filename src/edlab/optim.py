"""The optimizer (parameter groups: no decay on BN/bias, the BN-bias lr scale) and the learning-rate schedule.

The schedule is a closed form of the step number (plus the plateau rule's small state), so a resumed run
continues it from the step count alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import OptimConfig, SchedConfig
from .tricks import bn_biases, freeze_bn_weights


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
