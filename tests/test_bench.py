"""Latency benchmark: rows with the conditions, the dense parent rebuilt from a pruned checkpoint, the CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from edlab import EdlabError, create_model, save_checkpoint
from edlab.bench import benchmark, compare, dense_parent
from edlab.prune import prune_structured

# tiny models are coarse: "closest that whole channels allow" warnings are expected here
pytestmark = pytest.mark.filterwarnings("ignore:structured pruning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny():
    torch.manual_seed(0)
    return create_model("resnet20", width=0.25)


def test_benchmark_rows():
    rows = benchmark(tiny(), batch_sizes=[1, 4], threads=1, repeats=3)
    assert [r["batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["latency_ms"] > 0 and r["p10_ms"] <= r["latency_ms"] <= r["p90_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["latency_ms"] * 1e3)
        assert r["threads"] == 1 and r["device"] == "cpu" and r["repeats"] == 3
    assert torch.get_num_threads() == 1  # restored (the fixture's value)


def test_compare_gives_speedups_against_the_parent():
    dense = create_model("resnet20", width=0.5)
    pruned = prune_structured(create_model("resnet20", width=0.5), 0.75, target="macs")
    rows = compare({"parent": dense, "model": pruned}, [8], threads=1, repeats=5)
    by = {r["model"]: r for r in rows}
    assert by["parent"]["speedup"] == 1.0
    assert by["model"]["speedup"] == pytest.approx(by["parent"]["latency_ms"] / by["model"]["latency_ms"])


def test_bad_arguments():
    for kw in ({"batch_sizes": []}, {"batch_sizes": [0]}, {"repeats": 0}, {"threads": 0}):
        with pytest.raises(EdlabError):
            benchmark(tiny(), **{"batch_sizes": [1], "repeats": 1, **kw})


def test_dense_parent_and_cli(tmp_path):
    from edlab.cli import cli

    dense_path = save_checkpoint(tiny(), tmp_path / "dense.ckpt")
    pruned = prune_structured(tiny(), 0.5)
    path = save_checkpoint(pruned, tmp_path / "pruned.ckpt")
    parent = dense_parent(str(path), pruned)
    assert sum(p.numel() for p in parent.parameters()) == sum(p.numel() for p in tiny().parameters())
    assert dense_parent(str(dense_path), tiny()) is None

    r = CliRunner().invoke(cli, ["bench", str(path), "--batch-sizes", "1,2", "--repeats", "2", "--threads", "1",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = out["rows"]
    assert set(out["speedup"]) == {"1", "2"} and out["parent"]
    assert {(x["model"], x["batch_size"]) for x in rows} == {("parent", 1), ("parent", 2), ("model", 1), ("model", 2)}
    assert all("speedup" in x for x in rows)
    r = CliRunner().invoke(cli, ["bench", str(path), "--batch-sizes", "1", "--repeats", "2", "--threads", "1"])
    assert r.exit_code == 0 and "speed-up" in r.stdout and "parent" in r.stdout
    r = CliRunner().invoke(cli, ["bench", "resnet20", "--batch-sizes", "1,x"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "--batch-sizes" in r.stderr
