"""Concurrent runs: runs started in the same second get distinct folders, two runs never share one --out,
and a checkpoint written by two processes at once is always one writer's whole file."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from conftest import flat_weights as _weights
from killtest import env

from edlab import EdlabError, load_checkpoint, save_checkpoint
from edlab.models import create_model
from edlab.runs import Run


def test_runs_started_in_the_same_second_get_distinct_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    paths, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        paths.append(Run.create("same", root=str(tmp_path / "runs")).path)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8 and all(p.is_dir() for p in paths)


def test_two_runs_with_the_same_out_never_share_it(tmp_path):
    for trial in range(20):
        out, results, barrier = tmp_path / f"o{trial}", [], threading.Barrier(4)

        def start(out=out, results=results, barrier=barrier):
            barrier.wait()
            try:
                results.append(Run.create("x", str(out)).path)
            except EdlabError as e:
                results.append(e)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(isinstance(r, Path) for r in results) == 1, results


_TWIN = """
import sys, time, torch
from edlab import save_checkpoint
from edlab.models import create_model
from edlab.runs import Run
root, path, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(seed)
m = create_model("resnet20", width=0.25)
print("ready", flush=True)
t0 = float(sys.stdin.readline()) + 0.05  # the start, the same for both (+50 ms: time() lags a few ms)
while time.time() < t0:
    pass
print(Run.create("same", root=root).path, flush=True)
for _ in range(n):
    save_checkpoint(m, path, writer=seed)
"""


def test_twin_processes_same_second_same_name_same_checkpoint(tmp_path):
    """Two processes, released at the same whole second, create a run with the same name (distinct folders),
    then write the same checkpoint path 15 times each while this process reads it: every read sees one
    writer's whole checkpoint, never a torn or mixed file."""
    path = tmp_path / "shared.ckpt"
    save_checkpoint(create_model("resnet20", width=0.25), path, writer=-1)
    procs = [subprocess.Popen([sys.executable, "-c", _TWIN, str(tmp_path / "runs"), str(path), str(i), "15"],
                              env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    t0 = float(int(time.time()) + 1)
    for p in procs:
        p.stdin.write(f"{t0}\n")
        p.stdin.close()
    seen = set()
    while any(p.poll() is None for p in procs):
        seen.add(load_checkpoint(path).edlab_metadata["writer"])  # raises on a torn or mixed file
    dirs = [p.stdout.read().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(dirs)) == 2 and all(Path(d).is_dir() for d in dirs), dirs
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(t0))
    assert {Path(d).name[len("same-"):][:15] for d in dirs} == {stamp}, dirs  # really the same second
    final = load_checkpoint(path)
    torch.manual_seed(final.edlab_metadata["writer"])
    assert torch.equal(_weights(final), _weights(create_model("resnet20", width=0.25).eval()))
    assert seen & {0, 1}, seen
