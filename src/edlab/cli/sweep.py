"""edlab sweep -> edlab.study.sweep."""

from pathlib import Path

import click

from ._common import console


@click.command("sweep")
@click.argument("study_file", type=click.Path())  # a folder: one line from the reader
@click.option("--out", help="Study directory (default: the file's out:, else runs/study-<name>).")
@click.option("--storage", help="Optuna storage URL, e.g. postgresql://user@host/db (default: SQLite in --out).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes running trials at once on this machine, sharing the storage.")
@click.option("--quick", is_flag=True, help="Apply the file's quick: overrides (a separate study, out <out>-quick).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Extra fixed override of every trial.")
@click.option("--retry-failed", is_flag=True, help="Run again the points whose trials failed with an error.")
@click.option("--stale-after", type=float, default=600, show_default=True,
              help="Seconds without heartbeat after which another machine's RUNNING trial counts as dead.")
@click.option("--floor", type=float, help="The objective's accuracy floor (min_score_with_val_at_least), e.g. "
              "0.865; trials are selected at val >= floor + floor_margin. Another floor is another study "
              "(<name>-floor<F>).")
@click.option("--pruner", help="none or successive-halving | hyperband | median: replaces the file's pruner: "
              "(a separate study, <name>-pruner-<type>); --pruner none runs the same search at full fidelity.")
@click.option("--dry-run", is_flag=True, help="Check the study file and list its points; run nothing.")
@click.option("--finish", is_flag=True, help="End a stopped sweep with the trials it finished: start none, "
              "withdraw the unfinished ones (a later plain sweep runs them), then test, pack and report.")
@click.option("--worker", "worker_index", type=int, hidden=True)
def sweep(study_file, out, storage, workers, quick, sets, retry_failed, stale_after, floor, pruner, dry_run,
          finish, worker_index):
    """Run a study: one training (config:) or pipeline (recipe:) run per grid/list point or search trial.

    The study lives in an Optuna storage; run the same command again after any interruption and it
    finishes the remaining trials (finished ones are never repeated; a killed one is re-run). The same
    command started while another runs joins it and takes the points still waiting; only the one that ends
    the last trial reads the test split (test: chosen). At the end it prints a table and writes
    <out>/study.json. See docs/studies.md.

    \b
    Examples:
      edlab sweep studies/learning-rate.yaml        # GPU-sized
      edlab sweep studies/learning-rate.yaml --quick # minutes per trial on a CPU
      edlab sweep studies/challenge.yaml --workers 2
      edlab sweep studies/challenge.yaml --floor 0.865  # the course-equivalent floor: a separate study
      edlab sweep studies/multi-fidelity.yaml --pruner none  # the same grid at full fidelity
      edlab sweep studies/resnets.yaml --storage postgresql://me@db/edlab --workers 4
      timeout 3600 edlab sweep studies/challenge.yaml; edlab sweep studies/challenge.yaml --finish
    """
    from ..study import sweep as run_sweep

    c = console()
    report = run_sweep(study_file, out, storage, workers, quick, sets, retry_failed, stale_after, floor,
                       worker_index, dry_run, echo=c.print, pruner=pruner, finish=finish)
    if report is None:  # a dry run, or a worker (the sweep that started it reports)
        return
    render(report, c)
    c.print(f"-> {Path(report['out']) / 'study.json'}")


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render(report: dict, console) -> None:
    """The trials table, the counts and the winner of a study report."""
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    b = report["best"]
    chosen = set(b.get("pareto_front", [])) | ({b["slot"]} if "slot" in b else set())
    keys = list(dict.fromkeys(k for r in report["trials"] for k in (r["point"] or {})))
    table = Table(title=f"study {report['name']} ({report['mode']}, objective {report['objective']})")
    tails = [k.rsplit(".", 1)[-1] for k in keys]  # short headers where they stay unambiguous
    heads = [t if tails.count(t) == 1 else k for k, t in zip(keys, tails)]
    table.add_column("point", justify="right", no_wrap=True)
    table.add_column("state")
    for h in heads:
        table.add_column(h, overflow="fold")
    for col in ("val %", "test %", "views", "score", "MACs", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    errors: dict[str, int] = {}  # each failure's message once, below the table: a long one kept the table readable
    rerun = {r["slot"] for r in report["trials"] if not (r["state"] == "FAIL" and r["interrupted"])}
    for r in report["trials"]:
        if r["state"] == "FAIL" and r["interrupted"] and r["slot"] in rerun:
            continue  # re-run under another trial number
        mark = " *" if r["slot"] in chosen and r["state"] == "COMPLETE" else ""
        point = r["point"] or {}
        state = r["state"].lower().replace("complete", "done")
        if r.get("pruned_at") is not None:  # where the pruner stopped it: epoch k of the full run's K
            full = (r.get("full_epochs") or [None])[0]
            state = f"stopped @{r['pruned_at']}" + (f"/{full:g}" if full else "")
        if r["error"]:
            state = f"fail [{errors.setdefault(r['error'], len(errors) + 1)}]"
        elif r["state"] == "FAIL" and r["interrupted"]:  # killed or withdrawn (--finish), not run again yet
            state = "interrupted"
        table.add_row(f"{r['slot']:04d}{mark}" if r["slot"] is not None else "-", state,
                      *(_short(point.get(k, "")) for k in keys), pct(r["val_accuracy"]),
                      pct(r["test_accuracy"]), str(r.get("views") or 1),
                      "-" if r["score"] is None else f"{r['score']:.4f}",
                      "-" if r["macs"] is None else f"{r['macs'] / 1e6:.1f}M",
                      "-" if r["seconds"] is None else f"{r['seconds']:.0f}")
    width = console.width
    if not console.is_terminal:  # a log file or pipe: no 80-column wrapping of a wide table
        console.width = 250
    console.print(table)
    for message, n in errors.items():
        console.print(f"[{n}] {message}", markup=False, highlight=False)
    console.width = width
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(report["counts"].items()))
    rule = b.get("rule", "pareto front")
    tested = {"chosen": "; test split read for * only, after the trials",
              "none": "; test split not read (test: none)"}.get(report.get("test"), "")
    console.print(f"{counts} of {report['size']}; * = selected on validation accuracy ({rule}){tested}")
    bud = report.get("budget") or {}
    if bud.get("pruner") and bud.get("full_fidelity_epochs") is not None:
        console.print(f"epochs spent {bud['spent_epochs']:g} of {bud['full_fidelity_epochs']:g} at full fidelity "
                      f"({bud['pruned_trials']} trial(s) stopped by the {bud['pruner']['type']} pruner)")
    w = report.get("winner")
    if w:
        console.print(f"winner: point {w['slot']:04d}, score {w['score']:.4f}, " +
                      (f"packed {w['pack']} ({w['sizes']['file']:,} bytes)" if w.get("pack") else
                       f"not packed: {w.get('error')}"))
