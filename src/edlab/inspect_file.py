"""What ``edlab score`` and ``edlab info`` serve: the score of a model file (checkpoint, packed or .onnx
file, run folder, zoo name) and its story in a few lines, read from the file through edlab.loader and counted
by edlab.scoring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .checkpoint import stage_history
from .errors import EdlabError
from .loader import load_model, resolve_model_path
from .onnx_model import onnx_profile
from .scoring import Profile, parse_size, profile
from .views import TTA_VIEWS


def score_file(target: str, rules: str = "course", input_size: str | Sequence[int] = "3,32,32",
               bits_w: int | None = None, bits_a: int | None = None, tta: str = "recorded") -> Profile:
    """The profile (score, terms, per-layer rows) of a checkpoint, packed or .onnx file, run folder or zoo
    model name: what ``edlab score`` prints. ``tta``: the test-time views charged; "recorded" = those the
    file's accuracy was measured with. ``bits_w``/``bits_a``: a what-if for every layer."""
    size = parse_size(input_size)
    if tta != "recorded" and tta not in TTA_VIEWS:
        raise EdlabError(f"unknown tta '{tta}' (choices: recorded, {', '.join(TTA_VIEWS)})")
    views = None if tta == "recorded" else TTA_VIEWS[tta]
    target = resolve_model_path(target)
    if target.endswith(".onnx"):
        if rules != "course" or bits_w or bits_a:
            raise EdlabError("an ONNX file is scored as it is, under the course rules (no --rules/--bits-*)")
        return onnx_profile(target, views=views)
    return profile(load_model(target), input_size=size, rules=rules, bits_w=bits_w, bits_a=bits_a, views=views)


def describe(target: str, input_size: str | Sequence[int] = "3,32,32") -> tuple[list[str], Profile]:
    """The story of a model file (``edlab info``): lines of text (rich markup for the file name) and its
    profile. A zoo model name: its size with fresh weights."""
    size = parse_size(input_size)
    target = resolve_model_path(target)
    if target.endswith(".onnx"):
        p = onnx_profile(target)
        meta = load_model(target).edlab_metadata
        kind = "ONNX file (ONNX Runtime)"
    else:
        model = load_model(target)
        p = profile(model, input_size=size)
        meta = getattr(model, "edlab_metadata", None) or {"config": {"model": {"name": target}}}
        kind = "packed file" if getattr(model, "edlab_packed", False) else \
            "checkpoint" if Path(target).exists() else "zoo model (fresh weights)"
    return story_lines(target, kind, meta, p), p


def story_lines(target: str, kind: str, meta: dict, p: Profile) -> list[str]:
    """What `edlab info` prints: the file's history in a few lines, from its recorded metadata."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    size = f", {Path(target).stat().st_size:,} bytes" if Path(target).is_file() else ""
    m, d = cfg.get("model") or {}, cfg.get("data") or {}
    lines = [f"[bold]{target}[/bold]: {kind}{size}"]
    arch = m.get("name") or "-"
    if m:
        arch += f" (width {m.get('width', 1)}, conv {m.get('conv', 'standard')})"
    extra = p.params - p.arch_params  # LSQ step sizes, BinaryConnect scales: counted in w, not architecture
    counted = f"{p.arch_params:,} weights and biases + {extra:,} quantizer step sizes/scales = {p.params:,} " \
        "parameters counted" if extra > 0 else f"{p.params:,} parameters counted"
    lines.append(f"architecture: {arch}; {counted} ({p.nonzero_params:,} nonzero), {p.macs:,} MACs per forward pass")
    stages = stage_history(meta)
    if d:
        split = d.get("split_seed", cfg.get("seed"))
        # the config is the last stage's: its train_subset is what that stage trained on (each stage's own
        # count is in the stages line)
        last = f"its last stage ({stages[-1].get('stage', '?')})" if len(stages) > 1 else "it"
        lines.append(f"data: {d.get('dataset', '-')}, validation split {d.get('val_size', '-')} training images "
                     f"(split_seed {split})" + (f"; {last} trained on {d['train_subset']:,} images"
                                                if isinstance(d.get("train_subset"), int) else ""))
    inference = meta.get("inference") or {}
    acc = [f"{k} {100 * meta[k + '_accuracy']:.2f} %" for k in ("test", "val")
           if isinstance(meta.get(k + "_accuracy"), (int, float)) and 0 <= meta[k + "_accuracy"] <= 1]
    # (an accuracy outside [0, 1]: the -1 "no validation split" of checkpoints written before it was None)
    if acc or inference:
        how = f"tta {inference.get('tta', cfg.get('tta', 'none'))} ({p.views} view{'s' * (p.views > 1)} per image)"
        how += f", {inference['precision']}" if inference.get("precision") else ""
        lines.append(f"accuracy: {', '.join(acc) or 'not recorded'}; measured with {how}")
    if stages:
        def one(s: dict) -> str:
            extra = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
                              if k not in ("stage", "test_accuracy", "views") and v not in (None, 0, False))
            return s.get("stage", "?") + (f" ({extra})" if extra else "")
        lines.append("stages: " + " -> ".join(one(s) for s in stages))
    lines.append(f"score {p.score:.4f} = params term {p.score_params_term:.4f} + ops term {p.score_ops_term:.4f} "
                 f"({p.rules} rules; bits w/a {p.bits_w:.3g}/{p.bits_a:.3g}; ps {p.ps:.3f}, pu {p.pu:.3f}"
                 + (f"; f charged {p.views}x: {p.views} views per image" if p.views > 1 else "") + ")")
    if cfg.get("epochs") is not None:
        o, sch = cfg.get("optim") or {}, cfg.get("sched") or {}
        lines.append(f"training config: {cfg.get('epochs')} epochs, {o.get('name')} lr {o.get('lr')} wd "
                     f"{o.get('weight_decay')}, {sch.get('name')} schedule, batch {d.get('batch_size')}, augment "
                     f"{d.get('augment')}, seed {cfg.get('seed')}" + (f", ema {cfg['ema']}" if cfg.get("ema") else ""))
    return lines
