"""Learning-rate range test (Smith 2017): raise the lr exponentially over a few hundred steps and watch
the training loss. The suggestion is the lr of steepest loss descent, a common starting point; the plot
shows the whole curve so the user can judge."""

from __future__ import annotations

import math

import torch.nn as nn

from .config import TrainConfig
from .device import autocast, resolve_precision
from .optim import build_optimizer
from .options import LrFindOptions, takes


def lr_range_test(model: nn.Module, data, cfg: TrainConfig, start: float = 1e-6, end: float = 10.0,
                  steps: int = 100, smooth: float = 0.9, progress=None) -> dict:
    """Returns {'lrs', 'losses' (smoothed), 'suggested_lr'}; the model's weights are restored after.
    ``progress(text)``, if given, hears a line every tenth of the steps (a CPU run takes minutes)."""
    device = data.train.device
    amp = resolve_precision(cfg.precision, device)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device).train()
    opt = build_optimizer(model, cfg.optim)
    ce = nn.CrossEntropyLoss()
    lrs, losses, avg, best = [], [], 0.0, math.inf
    gamma = (end / start) ** (1 / max(1, steps - 1))
    it, epoch = iter(data.train), 0
    for i in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            epoch += 1
            data.train.set_epoch(epoch)
            it = iter(data.train)
            x, y = next(it)
        lr = start * gamma**i
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast(device, amp):
            loss = ce(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        avg = smooth * avg + (1 - smooth) * value if math.isfinite(value) else math.inf
        corrected = avg / (1 - smooth ** (i + 1))
        lrs.append(lr)
        losses.append(corrected)
        best = min(best, corrected)
        if progress is not None and (i + 1) % max(1, steps // 10) == 0:
            progress(f"lr-find: step {i + 1}/{steps}  lr {lr:.3g}  smoothed loss {corrected:.4g}")
        if not math.isfinite(corrected) or corrected > 4 * best:  # diverged: the rest is noise
            break
    model.load_state_dict(saved)
    # steepest descent of the smoothed loss against log(lr), ignoring the noisy first and last points
    k = max(1, len(losses) // 10)
    grads = [(losses[i + 1] - losses[i - 1]) for i in range(k, len(losses) - k)]
    suggested = lrs[k + min(range(len(grads)), key=grads.__getitem__)] if grads else lrs[len(lrs) // 2]
    return {"lrs": lrs, "losses": losses, "suggested_lr": suggested}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"])
    ax.axvline(result["suggested_lr"], color="red", ls="--", label=f"suggested {result['suggested_lr']:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@takes(LrFindOptions)
def find_lr(config: str | None = None, sets: list[str] | tuple[str, ...] = (), progress=None, **options) -> dict:
    """``edlab lr-find`` as a call: the training config (file, ``sets``) and the options of
    edlab.options.LrFindOptions -> {'lrs', 'losses', 'suggested_lr', 'plot'}; the plot is written to
    ``plot_path`` unless it is None."""
    from .config import load_train_config
    from .data import data_from_config
    from .device import resolve_device, use_threads
    from .train import model_from_config

    o = LrFindOptions.of(options)
    steps, start, end, plot_path = o.steps, o.start, o.end, o.plot_path
    cfg = load_train_config(config, o.config_tree(), list(sets))
    use_threads(cfg.threads)
    device = resolve_device(cfg.device)
    data = data_from_config(cfg, device)
    model = model_from_config(cfg, data.num_classes)
    r = lr_range_test(model, data, cfg, start, end, steps, progress=progress)
    if plot_path:
        plot(r, plot_path)
    return {**r, "plot": plot_path}
