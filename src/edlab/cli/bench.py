"""edlab bench -> edlab.bench.bench_target."""

import click

from ._common import console, echo_json


@click.command("bench")
@click.argument("target")
@click.option("--parent", help="Dense model to compare with (checkpoint or model name). Default: for a pruned "
              "checkpoint, its architecture rebuilt dense from the checkpoint's spec.")
@click.option("--no-parent", is_flag=True, help="Measure the target alone.")
@click.option("--batch-sizes", default="1,32", show_default=True)
@click.option("--threads", type=int, help="CPU threads (default: torch's, i.e. OMP_NUM_THREADS or all cores).")
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed runs; the median is reported.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--input-size", default="3,32,32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench(target, parent, no_parent, batch_sizes, threads, repeats, device, input_size, as_json):
    """Measured inference latency and throughput of a model, against its dense parent.

    \b
    Examples:
      edlab bench runs/r18-pruned/model.ckpt                 # vs the dense resnet18 it came from
      edlab bench runs/r18-pruned/model.ckpt --threads 1 --batch-sizes 1,32,256 --repeats 30
      edlab bench resnet20 --parent resnet56 --device cuda --json
    """
    from ..bench import bench_target

    r = bench_target(target, parent, no_parent, batch_sizes, threads, repeats, device, input_size, macs=not as_json)
    if as_json:  # an object, not a bare list, so that callers (e.g. `edlab run` pipelines) can read keys
        echo_json({k: r[k] for k in ("target", "parent", "speedup", "rows")})
        return
    _render(r["rows"], r["macs"], input_size)


def _render(rows: list[dict], macs: dict[str, int], input_size: str) -> None:
    from rich import box
    from rich.table import Table

    r0 = rows[0]
    where = f"{r0['device']}, threads {r0['threads']}" if r0["threads"] else r0["device"]
    table = Table(title=f"inference latency ({where}, median of {r0['repeats']}, input "
                        f"{input_size.replace(',', 'x')})", box=box.SIMPLE_HEAD)
    header = ("model", "MACs/image", "batch", "latency ms", "p10-p90 ms", "images/s", "speed-up")
    lines = [(r["model"], f"{macs[r['model']]:,}", str(r["batch_size"]), f"{r['latency_ms']:.2f}",
              f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}", f"{r['images_per_s']:,.0f}",
              f"{r['speedup']:.2f}x" if "speedup" in r else "-") for r in rows]
    for i, col in enumerate(header):  # never cut a number, whatever the terminal width
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True,
                         min_width=max(len(col), *(len(line[i]) for line in lines)))
    for line in lines:
        table.add_row(*line)
    console().print(table)
