"""``edlab report --page PAGE.yaml``: a results page in sections, each one study's measured table and figure,
rebuilt from committed run folders by one command.

Why a page file: a study page (the seed deck's, docs/results/deck.md) interleaves prose that a person writes —
what the students set and saw, what edlab found and why — with tables and plots that must always equal the
runs. The prose lives in the page file beside the folders each section reads, so rebuilding the page never
loses it and never leaves a number that a run no longer says.

A page file::

    title: The seed deck's studies, measured
    out: deck.md                 # the Markdown page; its figures go beside it (deck-<slug>.png)
    floors: [0.9, 0.865]         # accuracy lines on the Pareto plot across every section
    intro: |                     # any Markdown, after the rebuild command
      ...
    sections:
      - title: Batch size 32 -> 64
        deck: the students' setting and observation (quoted)
        command: edlab sweep studies/seed-deck.yaml       # how the runs were made
        runs: [deck/seed]                                # run/study folders, relative to the page file
        where: {optim.lr: 0.001, data.augment: crop-flip}  # optional: the runs with these config values
        plot: curves             # curves | sparsity | none
        note: what the measurement says (Markdown)

Every path is relative to the page file, so the page rebuilds from any working directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import EdlabError
from .report import RunInfo, discover, markdown_table, pareto_front, plot_curves, plot_pareto, read_jsonl

COLUMNS = ["run", "val %", "test %", "params", "MACs", "bits w/a", "ps/pu", "views", "score", "minutes", "min/epoch"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    deck: str = ""  # the students' setting and observation
    command: str = ""  # the edlab command that made the runs
    runs: list[str] = Field(default_factory=list)  # folders holding this section's runs
    where: dict[str, Any] = Field(default_factory=dict)  # config values a run needs to be shown here, e.g.
    # {optim.lr: 0.001}: sections that ask one question each of one shared study (its baseline run is shared)
    plot: Literal["curves", "sparsity", "none"] = "curves"
    note: str = ""  # what edlab measured, in words (Markdown)


class Page(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    out: str = "page.md"
    floors: list[float] = Field(default_factory=lambda: [0.9, 0.865])
    intro: str = ""
    sections: list[Section]


def load_page(path: str | Path) -> Page:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdlabError(f"page file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
        return Page.model_validate(tree if isinstance(tree, dict) else {})
    except yaml.YAMLError as e:
        raise EdlabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "the file"
        raise EdlabError(f"{path}: {where}: {err['msg']}") from None


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "section"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def point_label(r: RunInfo) -> str:
    """A study trial named by its point (``data.batch_size=32``), which says more than its folder (trials/0001);
    a stage folder of a recipe trial keeps its stage name after it."""
    for study in r.path.parents:
        if (study / "study.json").is_file():
            try:
                trials = json.loads((study / "study.json").read_text()).get("trials") or []
            except (OSError, ValueError, AttributeError):
                return r.name
            for t in trials:
                # run_dir is as the sweep's working directory saw it: its trials/NNNN tail is the folder here
                tail = Path(str(t.get("run_dir", ""))).parts[-2:] if isinstance(t, dict) else ()
                run_dir = study.joinpath(*tail) if len(tail) == 2 else None
                if run_dir and isinstance(t.get("point"), dict) and run_dir.resolve() in (r.path, *r.path.parents):
                    point = ", ".join(f"{k}={v}" for k, v in t["point"].items())
                    stage = r.path.relative_to(run_dir.resolve()).as_posix()
                    return point + ("" if stage == "." else f" ({stage})")
            return r.name
    return r.name


def row_cells(r: RunInfo) -> list[str]:
    """One run as the page shows it: every figure read from its summary.json (the study's chosen test, when
    the study read the test split only for its chosen point, as the report puts it on that run)."""
    s = r.summary
    bits = f"{_num(s.get('bits_w')) or 32:.3g}/{_num(s.get('bits_a')) or 32:.3g}"  # a mean: 1.3015 reads 1.3
    ps, pu = _num(s.get("ps")) or 0.0, _num(s.get("pu")) or 0.0
    inference = s.get("inference") if isinstance(s.get("inference"), dict) else {}
    views = s.get("views") if s.get("views") is not None else inference.get("views")
    seconds, epochs = _num(s.get("seconds")), _num(s.get("epochs"))
    per_epoch = "—" if seconds is None or not epochs else f"{seconds / epochs / 60:.2f}"  # what a model costs to train
    return [point_label(r), _pct(_num(r.val)), _pct(r.test), f"{int(s.get('params') or 0):,}",
            f"{int(s.get('macs') or 0):,}", bits, f"{ps:.2f}/{pu:.2f}", "" if views is None else str(views),
            "—" if r.score is None else f"{r.score:.4f}", "—" if seconds is None else f"{seconds / 60:.1f}", per_epoch]


def compute_line(runs: list[RunInfo]) -> str:
    """What the runs cost, summed from their summaries' own clocks (a study's trial counts its stages): the
    page answers "how many CPU-hours did this take" without a note that could drift from the folders."""
    seconds = [_num(r.summary.get("seconds")) for r in runs]
    hosts = {(h.get("kind"), h.get("threads")) if isinstance(h := r.summary.get("host"), dict) else None
             for r in runs}
    where = "" if len(hosts) != 1 or None in hosts else " on one {} CPU, {} thread(s)".format(*hosts.pop())
    total = sum(x for x in seconds if x is not None)
    unknown = sum(x is None for x in seconds)
    return (f"*{len(runs)} run(s): {total / 60:.1f} minutes ({total / 3600:.2f} hours) by their own clocks{where}"
            + (f"; {unknown} without a recorded time" if unknown else "") + ".*")


def plot_sparsity(runs: list[RunInfo], path: Path) -> bool:
    """Accuracy against the pruned fraction ps + pu (val filled, test hollow), with the validation accuracy
    right after the last pruning step, before its fine-tuning (crosses) and the dense source: the pruning
    slides' questions (how much accuracy each sparsity costs, and what fine-tuning gives back)."""
    from matplotlib.figure import Figure

    pts = [(_num(r.summary.get("ps")) or 0.0) + (_num(r.summary.get("pu")) or 0.0) for r in runs]
    if not runs:
        return False
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    steps = [read_jsonl(r.path / "metrics.jsonl") for r in runs]  # prune: dense, then each step
    dense = {s[0]["val_accuracy"] for s in steps if s and s[0].get("kind") == "dense" and s[0].get("val_accuracy")}
    if len(dense) == 1:
        ax.scatter([0.0], [dense.pop()], color="k", marker="s", label="dense source (validation)", zorder=3)
    before = [(x, s[-1]["val_accuracy_pruned"]) for x, s in zip(pts, steps)
              if s and s[-1].get("val_accuracy_pruned") is not None]
    if before:
        ax.scatter(*zip(*before), color="C3", marker="x", label="validation, pruned before fine-tuning", zorder=3)
    ax.scatter(pts, [r.val for r in runs], color="C0", label="validation accuracy", zorder=3)
    tested = [(x, r.test) for x, r in zip(pts, runs) if r.test is not None]
    if tested:
        ax.scatter(*zip(*tested), facecolors="none", edgecolors="C1", label="test accuracy", zorder=3)
    ax.set(xlabel="pruned fraction of the dense parameters (ps + pu)", ylabel="accuracy",
           title="accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return True


def _same(value: Any, wanted: Any) -> bool:
    """A config value as a section's ``where`` asks for it (numbers by value: 1e-3 is 0.001)."""
    if isinstance(wanted, (int, float)) and not isinstance(wanted, bool) and isinstance(value, (int, float)):
        return abs(float(value) - float(wanted)) <= 1e-12 * max(1.0, abs(float(wanted)))
    return value == wanted


def build_page(page_file: str | Path) -> dict:
    """Write the page (and its figures) the page file describes; returns {out, figures, sections: {title: runs}}.
    A section whose folders hold no runs yet says so on the page, so a page can be laid out before its runs."""
    page_file = Path(page_file)
    page = load_page(page_file)
    home = page_file.resolve().parent
    out = (home / page.out).resolve()
    if out.suffix != ".md":
        raise EdlabError(f"{page_file}: out must name a Markdown file (.md), got {page.out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    md = [f"# {page.title}\n",
          f"Rebuilt from the committed run folders by `edlab report --page {_shown(page_file)}` "
          "(tables and figures; the prose is in that file).\n"]
    if page.intro:
        md.append(page.intro.strip() + "\n")
    every: list[RunInfo] = []
    figures: list[str] = []
    found: dict[str, int] = {}
    for k, sec in enumerate(page.sections, 1):
        md.append(f"## {k}. {sec.title}\n")
        if sec.deck:
            md.append("\n".join("> " + line for line in sec.deck.strip().splitlines()) + "\n")
        if sec.command:
            md.append(f"```\n{sec.command.strip()}\n```\n")
        folders = [home / f for f in sec.runs]
        missing = [f for f, p in zip(sec.runs, folders) if not p.is_dir()]
        runs = discover([p for p in folders if p.is_dir()])[0] if len(missing) < len(folders) else []
        runs = [r for r in runs if all(_same(r.get(*key.split(".")), v) for key, v in sec.where.items())]
        runs.sort(key=lambda r: r.name)
        found[sec.title] = len(runs)
        if runs:
            md.append(markdown_table(COLUMNS, [row_cells(r) for r in runs]))
            md.append(compute_line(runs) + "\n")
            every += [r for r in runs if r.path not in {e.path for e in every}]  # a shared run: once
            name = f"{stem}-{k:02d}-{slug(sec.title)}.png"
            labels = [point_label(r) for r in runs]  # (each reads its study.json: once a run)
            for r, label in zip(runs, labels):  # the legend names a trial by what this section varies
                r.name = ", ".join(p for p in label.split(", ") if p.split("=", 1)[0] not in sec.where) or label
            drawn = plot_curves(runs, out.parent / name) if sec.plot == "curves" else \
                plot_sparsity(runs, out.parent / name) if sec.plot == "sparsity" else False
            if drawn:
                md.append(f"![{sec.title}]({name})\n")
                figures.append(name)
            for r, label in zip(runs, labels):  # on the plot across sections, a run is named by its section too
                r.name = f"{k}: {label}"
        else:
            md.append(f"*Not measured yet: no runs under {', '.join(sec.runs) or '(no folder named)'}.*\n")
        if sec.note:
            md.append(sec.note.strip() + "\n")
    md.append("## The trade-off across every section\n")
    if every:
        md.append("All sections together (a shared run once): " + compute_line(every) + "\n")
    pareto = f"{stem}-pareto.png"
    if every and plot_pareto(every, pareto_front([(r.score, r.val) for r in every]), None, out.parent / pareto,
                             page.floors):
        md.append(f"![score vs accuracy]({pareto})\n")
        figures.append(pareto)
    else:
        md.append("*No run with a score yet.*\n")
    out.write_text("\n".join(md))
    return {"out": out, "figures": figures, "sections": found}


def report_or_page(paths: list[str | Path] | tuple, out: str | Path = "report",
                   floor: float | list[float] | tuple[float, ...] = 0.9, title: str = "edlab report",
                   page: str | Path | None = None) -> dict:
    """What `edlab report` (the command and a recipe's report stage) does: a comparison page of the run folders
    (:func:`edlab.report.build_report`), or, given ``page``, the sectioned page its page file describes."""
    from .report import build_report

    if page is None:
        if not paths:
            raise EdlabError("give run, pipeline or study folders (or a page file: --page FILE)")
        return build_report(list(paths), out, floor, title)
    if paths:
        raise EdlabError("--page reads its folders from the page file: give no PATHS with it")
    return build_page(page)


def _shown(path: Path) -> str:
    """The page file as a user types it: relative to the working directory when it lies below it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)
