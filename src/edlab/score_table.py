"""The per-layer score table that ``edlab score`` and ``edlab info --layers`` print (rich, imported only when
a table is drawn): the counting is edlab.scoring's, this module only draws it."""

from __future__ import annotations

from typing import Any

from .scoring import Profile, Row


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"


def _bits(b: float | None) -> str:
    return "-" if b is None else f"{b:g}" if float(b).is_integer() else f"{b:.2f}"


def _cells(name: str, kind: str, r: Row | Profile, extra: bool) -> list[str]:
    """One table line; a Profile gives the totals line (same counts, shares 100 %)."""
    nonzero = r.nonzero if isinstance(r, Row) else r.nonzero_params
    shares = (r.share_params, r.share_ops) if isinstance(r, Row) else (1.0, 1.0)
    cells = [name, kind, f"{r.params:,}", f"{nonzero:,}", f"{r.macs:,}"] + (
        [f"{r.ops:,.0f}"] if extra else []
    )
    return cells + [
        f"{_bits(r.bits_w)}/{_bits(r.bits_a)}",
        f"{100 * shares[0]:.1f}",
        f"{100 * shares[1]:.1f}",
    ]


def render(profile: Profile, console: Any = None) -> None:
    """Print the per-layer table, the totals, both terms, the formula view and the rules line."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    p = profile
    extra = p.ops != p.macs  # the rules count more than MACs: show what f counts per layer
    header = (
        ["layer", "type", "params", "nonzero", "MACs"] + (["ops"] if extra else []) + ["bits", "%w", "%f"]
    )
    lines = [_cells(r.name, r.type, r, extra) for r in p.rows] + [_cells("total", "", p, extra)]
    views = f", {p.views} views per image" if p.views > 1 else ""
    title = f"edlab score ({p.rules} rules, input {'x'.join(map(str, p.input_size))}{views})"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.caption = "bits: weight/activation; %w, %f: share of the params and ops terms"
    if p.nonzero_params == p.params:  # nothing to say per layer: give the width to the names
        header.remove("nonzero")
        lines = [line[:3] + line[4:] for line in lines]
        table.caption += "; no zero weights"
    table.add_column("layer", overflow="fold", min_width=12)  # a narrow terminal wraps the names...
    table.add_column("type", overflow="ellipsis", min_width=6)
    for i, col in enumerate(header[2:], 2):  # ...and never cuts a number
        width = max(len(col), *(len(line[i]) for line in lines))
        table.add_column(col, justify="right", no_wrap=True, min_width=width)
    for i, line in enumerate(lines):
        table.add_row(*line, style="bold" if i == len(lines) - 1 else None)
    console.print(table)
    console.print(
        f"[bold]score = {_num(p.score)}[/bold]  (params term {_num(p.score_params_term)} "
        f"+ ops term {_num(p.score_ops_term)})"
    )
    v = p.formula_view
    if v:
        console.print(
            f"formula view: w = {v['w']:,}, f = {v['f']:,}, ps = {v['ps']:.4f}, pu = {v['pu']:.4f}, "
            f"qw = {_bits(v['qw'])}, qa = {_bits(v['qa'])} -> {_num(v['score'])}  "
            f"(MAC reduction 1 - macs/f = {v['ps_macs']:.4f})"
        )
    else:
        console.print(
            f"ps = {p.ps:.4f}, pu = {p.pu:.4f} (the course formula view does not apply to these rules)"
        )
    console.print(f"rules: {p.rules_description}")
    for note in p.notes:
        console.print(f"note: {note}")
