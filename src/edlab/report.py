"""``edlab report``: one static page that compares runs: curves, a table, score vs accuracy, layer costs.

Why a static page: it opens from disk anywhere (a laptop, a CI artifact, a course hand-in) with no server
and nothing fetched from the network. The HTML has its CSS inline and shows PNG figures saved beside it
(matplotlib's Agg canvas, no display needed); report.md repeats the table so docs can embed it.

Inputs are directories searched recursively. A run dir is any folder with a summary.json (what
``edlab train``, ``prune`` and ``quantize`` write); pipeline dirs (``edlab run``) and study dirs
(``edlab sweep``: study.json + trials/NNNN/) are found the same way, and their name groups their runs.
Stage folders holding only a result.json (score, eval, bench stages) are listed in a small table of their
own. A run without metrics.jsonl or model.ckpt is still a row; it just has no curve or breakdown. A folder
named on the command line that has per-epoch metrics but no summary.json yet (a long run still training, or
stopped to be resumed) is a row of kind "unfinished": its curves and its best validation so far, to compare it
with finished runs; it is never the best model (its weights are still moving) and has no score.

Output folder::

    index.html   the page            report.md    the runs table in Markdown
    curves.png   learning curves     pareto.png   score vs accuracy with the Pareto front
    layers.png   per-layer score of the best model (its model.ckpt, or the .onnx of an int8 stage)
    .edlab-report  marker: this folder is a report, so the next report may replace it
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdlabError

MARKER = ".edlab-report"
FIGURES = ("curves.png", "pareto.png", "layers.png")
SKIP_DIRS = {"tb", "wandb", "mlruns", "__pycache__", "node_modules"}  # never hold runs; can be huge


@dataclass
class RunInfo:
    """What the report knows about one run dir; every field may be missing (None)."""

    path: Path
    name: str
    group: str
    kind: str  # train | prune | quantize
    config: dict
    summary: dict
    curves: list[dict] = field(default_factory=list)  # rows: epoch, train/val accuracy and loss

    def get(self, *keys: str) -> Any:
        """A nested config value, e.g. get('optim', 'lr'); None when absent."""
        node: Any = self.config
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    @property
    def val(self) -> float | None:
        """Validation accuracy of the model the run kept (keep=best keeps the best epoch's weights)."""
        s = self.summary
        best = _num(s.get("best_val_accuracy"))
        best = best if best is not None and best >= 0 else None  # runs made before the fix stored -1: no val split
        if self.get("keep") == "best" and best is not None:
            return best
        v = _num(s.get("val_accuracy"))
        return v if v is not None else best

    @property
    def test(self) -> float | None:
        return _num(self.summary.get("test_accuracy"))

    @property
    def score(self) -> float | None:
        return _num(self.summary.get("score"))

    @property
    def dataset(self) -> str | None:
        d = self.get("data", "dataset") or self.summary.get("dataset")
        return d if isinstance(d, str) else None

    @property
    def checkpoint(self) -> Path | None:
        """The model file the run wrote: model.ckpt, or the .onnx of an int8 stage (or a packed file)."""
        from .runs import RUN_MODEL_FILES

        return next((self.path / n for n in RUN_MODEL_FILES if (self.path / n).is_file()), None)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON (or not UTF-8), nested too deep
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (metrics.jsonl, finetune.jsonl); a line cut by a crash is skipped."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError):
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # a line cut by a crash
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_curves(run_dir: Path) -> list[dict]:
    """Per-epoch rows for the learning curves.

    A train (or QAT) run logs one row per epoch in metrics.jsonl. A prune run logs one row per pruning step
    there, and its fine-tuning epochs in finetune.jsonl: those are numbered 1, 2, ... across the steps."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train_accuracy" in r or "train_loss" in r]
    if not rows and (run_dir / "finetune.jsonl").exists():
        rows = [{**r, "epoch": i} for i, r in enumerate(read_jsonl(run_dir / "finetune.jsonl"), 1)]
    return [r for r in rows if _num(r.get("epoch")) is not None]


def _kind(summary: dict) -> str:
    if "method" in summary:
        return "quantize"
    if "steps" in summary and "recipe" in summary:
        return "prune"
    return "train"


def _group_of(run_dir: Path, root: Path) -> str:
    """The nearest study (study.json) or, failing that, pipeline (pipeline.json) at or above the run."""
    chain = [run_dir, *run_dir.parents]
    chain = chain[: chain.index(root) + 1] if root in chain else [run_dir]
    for marker, label in (("study.json", "study"), ("pipeline.json", "pipeline")):
        for d in chain:
            if (d / marker).is_file():
                meta = _read_json(d / marker)
                name = meta.get("name") or meta.get("study_name") if isinstance(meta, dict) else None
                return f"{label} {name or d.name}"
    return ""


def discover(paths: list[str | Path]) -> tuple[list[RunInfo], list[dict], list[str]]:
    """Find run dirs (summary.json) and stage results (result.json) under each path, recursively.

    Returns (runs, results, skipped): skipped names folders whose summary.json could not be read, so the
    page can say what it left out instead of failing on one broken run."""
    roots = []
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise EdlabError(f"not found: {p}")
        if not root.is_dir():
            raise EdlabError(f"not a directory: {p} (give run, pipeline or study directories)")
        roots.append(root.resolve())
    runs: list[RunInfo] = []
    results: list[dict] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    for root in roots:
        prefix = root.name if len(roots) > 1 else ""
        for here, dirs, files in os.walk(root):
            d = Path(here)
            dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith(".")
                             and ".interrupted-" not in x and not (d / x / MARKER).exists())
            if d in seen:
                continue
            seen.add(d)
            rel = d.relative_to(root).as_posix()
            name = "/".join(x for x in (prefix, "" if rel == "." else rel) if x) or d.name
            if "summary.json" in files:
                summary = _read_json(d / "summary.json")
                if not isinstance(summary, dict):
                    skipped.append(f"{name} (summary.json unreadable)")
                    continue
                runs.append(RunInfo(path=d, name=name, group=_group_of(d, root), kind=_kind(summary),
                                    config=_read_yaml(d / "config.yaml"), summary=summary, curves=read_curves(d)))
            elif d == root and "metrics.jsonl" in files and (curves := read_curves(d)):
                runs.append(unfinished_run(d, name, _read_yaml(d / "config.yaml"), curves))
            elif "result.json" in files:
                res = _read_json(d / "result.json")
                if isinstance(res, dict):
                    # the row is named by its folder: a "name" in the file (a number, say) does not replace it
                    results.append({**res, "name": name, "group": _group_of(d, root)})
    _add_chosen_tests(runs)
    return runs, results, skipped


def unfinished_run(path: Path, name: str, config: dict, curves: list[dict]) -> RunInfo:
    """A run folder whose run has not ended: what its metrics say so far. Only the root of a search, so that a
    study's trials stopped by its pruner (no summary.json either) stay in its own table, not here."""
    vals = [(_num(c.get("val_accuracy")), c["epoch"]) for c in curves if _num(c.get("val_accuracy")) is not None]
    best_val, best_epoch = max(vals, key=lambda v: v[0]) if vals else (None, None)
    total = config.get("epochs")
    done = max(int(c["epoch"]) for c in curves)
    summary = {"best_val_accuracy": best_val, "best_epoch": best_epoch,
               "epochs": f"{done} of {total}" if _num(total) is not None else str(done)}
    return RunInfo(path=path, name=name, group="", kind="unfinished", config=config, summary=summary,
                   curves=curves)


def _add_chosen_tests(runs: list[RunInfo]) -> None:
    """A study with ``test: chosen`` left its trials untested (test_accuracy null) and recorded the test figure
    of each selected point in its study.json (``tested``: the model file and its accuracy): put that figure on
    the run whose model file it is, so the table and the Pareto plot show it."""
    studies = {d for r in runs for d in r.path.parents if (d / "study.json").is_file()}
    for study in studies:
        meta = _read_json(study / "study.json")
        trials = meta.get("trials") if isinstance(meta, dict) else None
        for t in trials if isinstance(trials, list) else []:
            tested = t.get("tested") if isinstance(t, dict) else None
            if not isinstance(tested, dict) or _num(tested.get("test_accuracy")) is None:
                continue
            file = Path(str(tested.get("checkpoint", ""))).as_posix()
            for r in runs:
                if r.summary.get("test_accuracy") is None and study in r.path.parents and \
                        file.endswith("/" + (r.path / "model.ckpt").relative_to(study).as_posix()):
                    r.summary = {**r.summary, "test_accuracy": tested["test_accuracy"], "tested_by_study": True}


STOP_COLUMNS = ["study", "point", "state", "epochs run", "of", "val at stop / end"]


def study_stops(paths: list[str | Path]) -> tuple[list[list[str]], list[str]]:
    """Where each trial of a multi-fidelity study (study.json with a pruner) stopped: one row per trial, and a
    line per study with the epochs it spent against the same search at full fidelity. The pruned trials have
    no summary.json, so the runs table does not show them: this does."""
    rows: list[list[str]] = []
    lines: list[str] = []
    for p in paths:
        for f in sorted(Path(p).rglob("study.json")):
            meta = _read_json(f)
            b = meta.get("budget") if isinstance(meta, dict) else None
            if not isinstance(b, dict) or not b.get("pruner") or not isinstance(meta.get("trials"), list):
                continue
            name = str(meta.get("name") or f.parent.name)
            lines.append(f"{name}: {_g(b.get('spent_epochs'))} of {_g(b.get('full_fidelity_epochs'))} training epochs "
                         f"at full fidelity, {b.get('pruned_trials')} trial(s) stopped by the "
                         f"{b['pruner'].get('type')} pruner")
            for t in meta["trials"]:
                if not isinstance(t, dict) or t.get("state") not in ("COMPLETE", "PRUNED"):
                    continue
                full = t.get("full_epochs") if isinstance(t.get("full_epochs"), list) else [None, None]
                stopped = t.get("pruned_at") is not None
                rows.append([name, f"{t.get('slot', 0) or 0:04d}",
                             f"stopped after epoch {t['pruned_at']}" if stopped else "ran to the end",
                             _g(t.get("epochs_run")), _g(full[1]), _pct(_num(t.get("val_accuracy")))])
    return rows, lines


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the points no other point beats: none has a lower-or-equal score and a higher-or-equal
    accuracy with one of them strictly better. Sorted by score. Points with a missing value are ignored;
    of identical points only the first is kept."""
    valid = [(s, -a, i) for i, (s, a) in enumerate(points) if _num(s) is not None and _num(a) is not None]
    front: list[int] = []
    best = -math.inf
    for _, neg_a, i in sorted(valid):  # by score, then by accuracy high to low, then by position
        if -neg_a > best:
            front.append(i)
            best = -neg_a
    return front


def choose_best(runs: list[RunInfo], floor: float) -> tuple[RunInfo | None, str]:
    """The model the page breaks down, and the rule that picked it (validation only: the test set is a
    final report, never a selection criterion)."""
    with_val = [r for r in runs if _num(r.val) is not None and r.kind != "unfinished"]
    if not with_val:
        return None, "no run has a validation accuracy"
    good = [r for r in with_val if r.val >= floor and r.score is not None]
    if good:
        best = min(good, key=lambda r: (r.score, -r.val))
        return best, f"lowest score among the runs with validation accuracy >= {100 * floor:g} %"
    best = max(with_val, key=lambda r: (r.val, -(r.score or math.inf)))
    return best, f"highest validation accuracy (no run reaches the {100 * floor:g} % floor)"


# --- figures ----------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    """A figure on the Agg canvas without pyplot: no display needed, no global backend switched."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def run_colors(n: int) -> list:
    """n distinct colours: matplotlib's 10 (up to 10 runs), tab20 (up to 20), else evenly spaced hues."""
    from matplotlib import colormaps

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def _step_starts(curves: list[dict]) -> list[float]:
    """Epochs (x positions) where a pruning step began: its fine-tuning rows carry the step number."""
    starts, last = [], None
    for row in curves:
        if "step" in row and row["step"] != last:
            starts.append(float(row["epoch"]) - 0.5)
            last = row["step"]
    return starts


def plot_curves(runs: list[RunInfo], path: Path) -> bool:
    """Accuracy, loss and generalization gap (train - val accuracy) per epoch, one colour per run.

    Readable with many runs: distinct colours for each, the legend beside the plots (not over them), the
    loss on a log axis (one diverged run must not flatten the others), whole-number epoch ticks, and a
    dotted line where each pruning step began."""
    from matplotlib.ticker import MaxNLocator

    shown = [r for r in runs if r.curves]
    if not shown:
        return False
    fig = _figure(14 + (3 if len(shown) > 12 else 0), 4.2 + 0.12 * max(0, len(shown) - 24))
    ax_acc, ax_loss, ax_gap = fig.subplots(1, 3)
    colors = run_colors(len(shown))
    losses: list[float] = []
    marked = False
    for r, c in zip(shown, colors):
        ep = [r_["epoch"] for r_ in r.curves]
        for ax, key, style in ((ax_acc, "train_accuracy", "--"), (ax_acc, "val_accuracy", "-"),
                               (ax_loss, "train_loss", "--"), (ax_loss, "val_loss", "-")):
            pts = [(e, _num(row.get(key))) for e, row in zip(ep, r.curves)]
            pts = [(e, v) for e, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=c, marker="." if len(pts) < 30 else None,
                        label=r.name if key == "val_accuracy" else None)
                if ax is ax_loss:
                    losses += [v for _, v in pts]
        gap = [(e, row["train_accuracy"] - row["val_accuracy"]) for e, row in zip(ep, r.curves)
               if _num(row.get("train_accuracy")) is not None and _num(row.get("val_accuracy")) is not None]
        if gap:
            ax_gap.plot(*zip(*gap), color=c, marker="." if len(gap) < 30 else None)
        for x in _step_starts(r.curves):
            for ax in (ax_acc, ax_loss, ax_gap):
                ax.axvline(x, color=c, linestyle=":", linewidth=1)
            marked = True
    ax_acc.set(title="accuracy (solid: val, dashed: train)", xlabel="epoch", ylabel="accuracy")
    ax_loss.set(title="loss (solid: val, dashed: train; log scale)", xlabel="epoch", ylabel="loss")
    if losses and min(losses) > 0:
        ax_loss.set_yscale("log")
    ax_gap.set(title="generalization gap: train - val accuracy", xlabel="epoch", ylabel="gap")
    ax_gap.axhline(0, color="0.6", linewidth=0.8)
    for ax in (ax_acc, ax_loss, ax_gap):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if marked:
        ax_gap.set_title(ax_gap.get_title() + "\ndotted: a pruning step began", fontsize=9)
    if len(shown) <= 12:
        ax_acc.legend(fontsize=7, loc="lower right")
    else:  # beside the plots, in columns, so that no curve is hidden
        fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside right upper", fontsize=6,
                   ncols=1 + len(shown) // 40)
    fig.savefig(path, dpi=90)
    return True


def plot_pareto(runs: list[RunInfo], front: list[int], best: RunInfo | None, path: Path,
                floors: tuple[float, ...] | list[float] = (0.9,)) -> bool:
    """Score (log x) vs accuracy: val filled, test hollow, the Pareto front of val (each point named), one
    dotted line per accuracy floor (e.g. the course's 90 % and its 86.5 % equivalent on the JPEG copy)."""
    pts = [(i, r) for i, r in enumerate(runs) if r.score is not None and r.score > 0]
    if not pts:
        return False
    fig = _figure(8, 5.2)
    ax = fig.subplots()
    vals = [(r.score, r.val) for _, r in pts if _num(r.val) is not None]
    tests = [(r.score, r.test) for _, r in pts if r.test is not None]
    if vals:
        ax.scatter(*zip(*vals), color="C0", label="validation accuracy", zorder=3)
    if tests:
        ax.scatter(*zip(*tests), facecolors="none", edgecolors="C1", label="test accuracy", zorder=3)
    on_front = [runs[i] for i in front if runs[i].score and runs[i].score > 0 and _num(runs[i].val) is not None]
    if on_front:
        ax.step([r.score for r in on_front], [r.val for r in on_front], where="post", color="C2",
                label="Pareto front (val): lowest score per accuracy")
        for k, r in enumerate(on_front):  # which run each front point is
            ax.annotate(r.name, (r.score, r.val), xytext=(4, 4 + 8 * (k % 3)), textcoords="offset points",
                        fontsize=7, color="C2")
    # a run far below the front and the floors (a failed or chance-level one) would squeeze the region where
    # the choice is made into a few pixels: the axis stops 10 points under them and such readings sit on it
    kept = [r.val for r in on_front] + list(floors)
    bottom = min(kept) - 0.1 if kept else None
    below = [x for x, a in vals + tests if bottom is not None and a < bottom]
    if below:
        ax.set_ylim(bottom=bottom, top=max([a for _, a in vals + tests] + list(floors)) + 0.02)
        ax.scatter(below, [bottom] * len(below), marker="v", color="0.4", clip_on=False, zorder=3,
                   label=f"{len(below)} reading(s) below {100 * bottom:.0f} %, drawn on the axis")
    if best is not None and best.score and _num(best.val) is not None:
        ax.scatter([best.score], [best.val], marker="*", s=220, color="C3", label=f"best: {best.name}", zorder=4)
    for k, f in enumerate(floors):
        ax.axhline(f, color=f"C{3 + k}", linestyle=":", label=f"{100 * f:g} % floor")
    ax.set_xscale("log")
    ax.set(xlabel="score (log scale, lower is better)", ylabel="accuracy", title="score vs accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=90)
    return True


def plot_layers(rows: list[dict], title: str, path: Path) -> bool:
    """Horizontal stacked bars: each layer's params term and ops term of the score."""
    rows = [r for r in rows if (r["params_term"] or 0) + (r["ops_term"] or 0) > 0]
    if not rows:
        return False
    fig = _figure(9, max(3.0, 0.18 * len(rows) + 1.2))
    ax = fig.subplots()
    y = list(range(len(rows)))
    p = [r["params_term"] for r in rows]
    o = [r["ops_term"] for r in rows]
    ax.barh(y, p, color="C0", label="params term")
    ax.barh(y, o, left=p, color="C1", label="ops term")
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=6 if len(rows) > 40 else 8)
    ax.invert_yaxis()
    ax.set(xlabel="contribution to the score", title=title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=90)
    return True


# --- tables -----------------------------------------------------------------------------------------------

COLUMNS = ["run", "group", "kind", "dataset", "model", "width", "conv", "optimizer", "lr", "batch", "wd", "augment",
           "epochs", "val %", "test %", "views", "params", "MACs", "bits w/a", "ps/pu", "score", "minutes"]


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _g(v: Any) -> str:
    return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _bits(v: Any) -> str:
    """Average bits, rounded: 7.999999 -> 8, 4.03125 -> 4.03."""
    return f"{v:.3g}" if _num(v) is not None else _g(v)


def _int(v: Any) -> str:
    return f"{int(v):,}" if _num(v) is not None else ""


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def teacher_leak(r: RunInfo) -> int:
    """Validation images of this run that a distillation teacher, of this stage or an earlier one, trained on
    (its val reads high)."""
    return int(max(_num(r.summary.get("teacher_val_leak")) or 0, _num(r.summary.get("val_leak")) or 0))


LEAK_NOTE = ("‡ distilled, in this stage or an earlier one, from a teacher that trained on images of this run's "
             "validation split: its val reads high (docs/training.md, Distillation)")


UNFINISHED_NOTE = ("unfinished: a run still training or stopped before its end (no summary.json yet): its val is "
                   "the best epoch's so far, its epochs those done; it has no score and is never the best model")


def run_cells(r: RunInfo) -> list[str]:
    s = r.summary
    bits = f"{_bits(s.get('bits_w'))}/{_bits(s.get('bits_a'))}" if s.get("bits_w") is not None else ""
    ps_pu = f"{s['ps']:.2f}/{s['pu']:.2f}" if _num(s.get("ps")) is not None and _num(s.get("pu")) is not None else ""
    seconds = _num(s.get("seconds"))
    inference = s.get("inference") if isinstance(s.get("inference"), dict) else {}
    views = _first(s.get("views"), inference.get("views"))
    return [r.name, r.group, r.kind, _g(r.dataset), _g(r.get("model", "name") or s.get("model")),
            _g(r.get("model", "width")),
            _g(r.get("model", "conv")), _g(r.get("optim", "name")), _g(r.get("optim", "lr")),
            _g(r.get("data", "batch_size")), _g(r.get("optim", "weight_decay")), _augment(r),
            _g(_first(s.get("epochs"), s.get("finetune_epochs_total"), r.get("epochs"))),
            _pct(_num(r.val)) + (" ‡" if r.val is not None and teacher_leak(r) else ""),
            _pct(r.test), _g(views), _int(s.get("params")), _int(s.get("macs")), bits, ps_pu,
            "" if r.score is None else f"{r.score:.4g}", "" if seconds is None else f"{seconds / 60:.3g}"]


LAYER_COLUMNS = ["layer", "type", "params", "nonzero", "MACs", "bits w/a", "params term", "ops term", "% of score"]


def _augment(r: RunInfo) -> str:
    """The augmentation as trained: crop-flip with crop_pad 0 shifts nothing (mirrors only, the setting that
    lets a teacher's logits be cached), which the policy's name alone would hide in a comparison; batch
    mixing (mixup, CutMix) and a teacher's crop pool change what the student sees as much, so they are named."""
    policy = r.get("data", "augment")
    text = "flip only (crop_pad 0)" if policy == "crop-flip" and r.get("data", "crop_pad") == 0 else _g(policy)
    extras = [f"{k} {_g(v)}" for k in ("mixup", "cutmix") if (v := r.get("data", k))]
    if r.get("distill", "teacher") and (pool := r.get("distill", "crop_pool")):
        extras.append(f"teacher crop pool {_g(pool)}")
    return " + ".join([text, *extras])


def layer_cells(row: dict, total: float) -> list[str]:
    share = (row["params_term"] + row["ops_term"]) / total if total else 0.0
    return [row["name"], row["type"], _int(row["params"]), _int(row["nonzero"]), _int(row["macs"]),
            f"{_bits(row['bits_w']) or '-'}/{_bits(row['bits_a']) or '-'}", f"{row['params_term']:.3g}",
            f"{row['ops_term']:.3g}", f"{100 * share:.1f}"]


TEXT_COLUMNS = {"run", "group", "kind", "dataset", "model", "conv", "optimizer", "augment", "layer", "type", "stage"}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    right = {i for i, h in enumerate(header) if h not in TEXT_COLUMNS}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in esc]) + "\n"


def html_table(header: list[str], rows: list[list[str]], marks: list[str] | None = None) -> str:
    """A plain table; ``marks`` holds a CSS class per row (best, front) or ''."""
    e = html.escape
    text = ["class='t'" if h in TEXT_COLUMNS else "" for h in header]
    head = "".join(f"<th {t}>{e(h)}</th>" for h, t in zip(header, text))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{marks[i]}"' if marks and marks[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td {t}>{e(c)}</td>" for c, t in zip(row, text)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } .t { text-align: left; }
tr.best { background: #fde2e2; font-weight: bold; } tr.front td:first-child::after { content: " \\2605"; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; } .wide { overflow-x: auto; }
"""


def _prepare_out(out: Path) -> None:
    """Refuse to write into a folder that holds anything but an earlier report."""
    from .runs import check_out_path

    check_out_path(out, "--out")  # a dangling link, or a file on the way to it
    if out.exists() and not out.is_dir():
        raise EdlabError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise EdlabError(f"--out {out} exists, is not empty and is not an edlab report (no {MARKER}); "
                         f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # an earlier report's figure must not outlive its data
        (out / name).unlink(missing_ok=True)


def build_report(paths: list[str | Path], out: str | Path, floor: float | list[float] | tuple[float, ...] = 0.9,
                 title: str = "edlab report") -> dict:
    """Write the report folder; returns what it found (runs, best, rule, figures) for the caller. ``floor``: one
    accuracy floor or several; the first picks the best model, all are drawn on the Pareto plot."""
    floors = [floor] if isinstance(floor, int | float) else list(floor) or [0.9]
    for f in floors:
        if not 0 <= f <= 1:
            raise EdlabError(f"--floor is an accuracy between 0 and 1, got {f}")
    floor = floors[0]
    out = Path(out)
    runs, results, skipped = discover(paths)
    if not runs:
        raise EdlabError(f"no run directories (with summary.json) under {', '.join(map(str, paths))}")
    if out.exists() and any(out.resolve() == r.path for r in runs):
        raise EdlabError(f"--out {out} is one of the run directories")
    _prepare_out(out)
    (out / MARKER).write_text(json.dumps({"edlab_report": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    runs.sort(key=lambda r: (r.group, r.name))
    front = pareto_front([(r.score, _num(r.val)) for r in runs])
    best, rule = choose_best(runs, floor)
    datasets = sorted({r.dataset or "unknown" for r in runs})
    per_dataset = {d: choose_best([r for r in runs if (r.dataset or "unknown") == d], floor) for d in datasets} \
        if len(datasets) > 1 else {}  # synthetic and CIFAR runs are not compared with each other
    figures = {"curves": plot_curves(runs, out / "curves.png"),
               "pareto": plot_pareto(runs, front, best, out / "pareto.png", floors)}
    layer_rows: list[dict] = []
    layer_note = ""
    if best is None:
        layer_note = "no best model: " + rule
    elif best.checkpoint is None:
        layer_note = f"{best.name} has no model file: no per-layer breakdown"
    else:
        from .inspect_file import score_file

        name = best.checkpoint.name
        try:  # a checkpoint, or the graph of an .onnx file (the int8 stage's model), as `edlab score` counts it
            s = best.summary
            size = tuple(s["input_size"]) if isinstance(s.get("input_size"), list) else (3, 32, 32)
            rules = "course" if name.endswith(".onnx") else s.get("rules") or "course"
            prof = score_file(str(best.checkpoint), rules=rules, input_size=size)
            layer_rows = [vars(r) for r in prof.rows]
            layer_note = (f"{best.name}: score {prof.score:.4g} = params term {prof.score_params_term:.4g} + "
                          f"ops term {prof.score_ops_term:.4g} ({prof.rules} rules, counted from {name})")
        except Exception as e:  # one unreadable model file must not cost the whole page
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            layer_note = f"{best.name}: {name} could not be profiled ({first})"
    figures["layers"] = bool(layer_rows) and plot_layers(layer_rows, f"per-layer score: {best.name}",
                                                         out / "layers.png")
    in_front = set(front)
    marks = ["best" if r is best else ("front" if i in in_front else "") for i, r in enumerate(runs)]
    table_rows = [run_cells(r) for r in runs]
    total = sum(r["params_term"] + r["ops_term"] for r in layer_rows)
    layer_table = [layer_cells(r, total) for r in layer_rows]
    best_line = f"Best model: **{best.name}** — rule: {rule}." if best else f"Best model: none ({rule})."
    groups = sorted({r.group for r in runs if r.group})

    in_groups = f" in {', '.join(groups)}" if groups else ""
    dataset_lines = [f"Best on {d}: **{b.name}** — {rl}." if b else f"Best on {d}: none ({rl})."
                     for d, (b, rl) in per_dataset.items()]
    md = [f"# {title}\n", f"{len(runs)} runs{in_groups}.\n", best_line + "\n",
          *(line + "\n" for line in dataset_lines), markdown_table(COLUMNS, table_rows)]
    leaky = any(teacher_leak(r) for r in runs)
    if leaky:
        md.append("\n" + LEAK_NOTE + "\n")
    unfinished = any(r.kind == "unfinished" for r in runs)
    if unfinished:
        md.append("\n" + UNFINISHED_NOTE + "\n")
    stops, stop_lines = study_stops(paths)
    if stops:
        md += ["\n## Multi-fidelity studies: where each trial stopped\n", *(line + "\n" for line in stop_lines),
               markdown_table(STOP_COLUMNS, stops)]
    md += [f"\n![{n}]({n}.png)\n" for n in ("curves", "pareto", "layers") if figures[n]]
    (out / "report.md").write_text("\n".join(md))

    e = html.escape
    page = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
            f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
            f"<p>{len(runs)} runs" + (f" in {e(', '.join(groups))}" if groups else "") +
            f" from {e(', '.join(str(p) for p in paths))}; generated {e(time.strftime('%Y-%m-%d %H:%M'))}.</p>",
            f"<p>Best model: <b>{e(best.name)}</b> — rule: {e(rule)}.</p>" if best else f"<p>{e(rule)}</p>",
            *(f"<p>Best on {e(d)}: <b>{e(b.name)}</b> — {e(rl)}.</p>" if b else f"<p>Best on {e(d)}: none.</p>"
              for d, (b, rl) in per_dataset.items()),
            "<h2>Runs</h2><p class='note'>val: validation accuracy of the kept model; test: read once at the "
            "end of each run. Red row: best model; &#9733;: on the Pareto front (validation).</p>",
            f"<div class='wide'>{html_table(COLUMNS, table_rows, marks)}</div>"]
    if leaky:
        page.append(f"<p class='note'>{e(LEAK_NOTE)}</p>")
    if unfinished:
        page.append(f"<p class='note'>{e(UNFINISHED_NOTE)}</p>")
    if skipped:
        page.append(f"<p class='note'>Left out: {e('; '.join(skipped))}</p>")
    page.append("<h2>Learning curves</h2>")
    page.append("<img src='curves.png' alt='learning curves'>" if figures["curves"] else
                "<p class='note'>No run has per-epoch metrics (metrics.jsonl).</p>")
    no_curve = [r.name for r in runs if not r.curves]
    if figures["curves"] and no_curve:
        page.append(f"<p class='note'>Without per-epoch metrics: {e(', '.join(no_curve))}</p>")
    page.append("<h2>Score vs accuracy</h2>")
    page.append("<img src='pareto.png' alt='score vs accuracy'>" if figures["pareto"] else
                "<p class='note'>No run has a score.</p>")
    page.append("<h2>Per-layer score of the best model</h2>")
    page.append(f"<p>{e(layer_note)}</p>")
    if figures["layers"]:
        page.append("<img src='layers.png' alt='per-layer score'>")
    if layer_table:
        page.append(f"<div class='wide'>{html_table(LAYER_COLUMNS, layer_table)}</div>")
    if stops:
        page += ["<h2>Multi-fidelity studies: where each trial stopped</h2>",
                 *(f"<p>{e(line)}</p>" for line in stop_lines), html_table(STOP_COLUMNS, stops)]
    if results:
        keys = ["score", "test_accuracy", "params", "macs"]
        rows = [[x["name"], x.get("group", ""), *("" if _num(x.get(k)) is None else f"{x[k]:.4g}" for k in keys)]
                for x in results]
        page += ["<h2>Stage results (result.json)</h2>", html_table(["stage", "group", *keys], rows)]
    page.append("</body></html>\n")
    (out / "index.html").write_text("\n".join(page))
    return {"runs": runs, "results": results, "skipped": skipped, "best": best, "rule": rule, "front": front,
            "best_per_dataset": {d: b.name if b else None for d, (b, _) in per_dataset.items()},
            "figures": [n for n, ok in figures.items() if ok], "out": out, "floors": floors}
