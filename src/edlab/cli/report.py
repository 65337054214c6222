"""edlab report -> edlab.page.report_or_page (a comparison page: edlab.report.build_report; --page: edlab.page)."""

from pathlib import Path

import click


@click.command("report")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--page", "page_file", type=click.Path(), default=None,
              help="Rebuild a sectioned results page from its page file (docs/report.md#pages) instead.")
@click.option("--out", default="report", show_default=True,
              help="Report folder; refused if it exists, is not empty and is not an earlier report.")
@click.option("--floor", type=float, multiple=True, default=(0.9,), show_default=True,
              help="Best model = lowest score with validation accuracy >= floor; none reach it: highest val. "
              "Repeat it to draw more floors on the Pareto plot (the first one selects).")
@click.option("--title", default="edlab report", show_default=True)
def report(paths, out, floor, title, page_file):
    """A static HTML page (plus PNGs and report.md) comparing runs found under run/pipeline/study folders.

    Opens from disk with no server or network: learning curves, the runs table, score vs accuracy with the
    Pareto front, and the per-layer score of the best model.

    \b
    Examples:
      edlab report runs/ --out report          # then open report/index.html
      edlab report runs/r20-compress studies/s1 --out cmp --floor 0.88
      edlab report runs/study-challenge --floor 0.9 --floor 0.865   # both challenge floors drawn
      edlab report runs/r20-300ep runs/r20-600ep --out cmp   # a run still training: row "unfinished"
      edlab report --page docs/results/deck.yaml   # rebuild docs/results/deck.md from its run folders
    """
    from ..page import report_or_page

    r = report_or_page(list(paths), out, list(floor), title, page=page_file)
    if page_file:
        empty = [t for t, n in r["sections"].items() if not n]
        click.echo(f"page: {len(r['sections'])} sections ({len(empty)} without runs yet), "
                   f"{len(r['figures'])} figures -> {r['out']}")
        return
    for name in r["skipped"]:  # one broken run costs its row, not the page
        click.echo(f"edlab: warning: left out {name}", err=True)
    best = f"; best: {r['best'].name} ({r['rule']})" if r["best"] else ""
    click.echo(f"report: {len(r['runs'])} runs, figures {', '.join(r['figures']) or 'none'}{best} "
               f"-> {Path(out) / 'index.html'}")
