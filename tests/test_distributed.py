"""torchrun data parallelism on CPU (gloo): 2 ranks must train like 1 process on the full batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from edlab.checkpoint import load_checkpoint

ARGS = ["--model", "resnet20", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
        "--set", "model.width=0.5", "--set", "data.val_size=200", "--set", "data.train_subset=384",
        "--set", "precision=fp32", "--set", "threads=1"]


def _run(cmd: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def _torchrun(args: list[str], tmp_path, name: str) -> tuple[subprocess.CompletedProcess, str]:
    """2 CPU ranks under torchrun, and what to show if they fail.

    --standalone: torchrun's agent binds a free port itself (port 0) for its store, where a port picked here
    and released could be taken by another process before torchrun binds it. gloo stays on the loopback
    interface, whatever the machine's hostname resolves to. Each rank writes its own stdout/stderr files
    (--redirects), shown in full on failure with torchrun's own tail, and PYTHONFAULTHANDLER makes a rank
    killed by a signal print its Python stacks: a crashed rank's message is not lost behind torchrun's report."""
    logs = tmp_path / f"{name}-logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if "lo" in {n for _, n in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--log-dir={logs}", "--redirects=3", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    shown = [f"torchrun exited {r.returncode}; its stderr ends:\n{r.stderr[-4000:]}"]
    for f in sorted(logs.rglob("*.log")):  # <run id>/attempt_0/<local rank>/{stdout,stderr}.log
        text = f.read_text(errors="replace")
        if text.strip():
            shown.append(f"--- {f.relative_to(logs)}:\n{text[-6000:]}")
    return r, "\n".join(shown)


needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


@pytest.mark.slow
@needs_gloo
def test_two_gloo_ranks_match_one_process(tmp_path):
    one = _run([sys.executable, "-m", "edlab", "train", *ARGS, "--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two, shown = _torchrun(["-m", "edlab", "train", *ARGS, "--out", str(tmp_path / "two")], tmp_path, "two")
    assert two.returncode == 0, shown

    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    m1 = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 2  # rank 0 alone wrote the metrics: one line per epoch, not two
    # Same global batches and averaged gradients: only the per-slice BN statistics differ (they are equal
    # with sync_bn, which needs GPUs), so the losses stay close; exactness is checked BN-free below.
    for a, b in zip(m1, m2):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.1 * a["train_loss"]
    w1 = torch.cat([p.flatten() for p in load_checkpoint(tmp_path / "one" / "model.ckpt").parameters()])
    w2 = torch.cat([p.flatten() for p in load_checkpoint(tmp_path / "two" / "model.ckpt").parameters()])
    start = torch.cat([p.flatten() for p in _initial(tmp_path).parameters()])
    # the two runs moved the weights the same way: their difference is small next to the distance travelled
    assert (w1 - w2).norm() < 0.8 * (w1 - start).norm()
    assert not (tmp_path / "runs").exists()  # no stray run directory from rank 1


def _initial(tmp_path):
    from edlab.config import load_train_config
    from edlab.train import model_from_config

    cfg = load_train_config(None, None, ["model.name=resnet20", "model.width=0.5"])
    return model_from_config(cfg, 10)


SCRIPT = """
import json, os, sys, torch, torch.nn as nn
from edlab import distributed
from edlab.config import load_train_config
from edlab.data import data_from_config
from edlab.train import fit

d = distributed.setup("cpu")
cfg = load_train_config(None, None, ["data.dataset=synthetic", "data.val_size=100", "data.train_subset=256",
                                     "data.batch_size=32", "epochs=2", "optim.lr=0.05", "precision=fp32"])
data = data_from_config(cfg, torch.device("cpu"))
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 10))
fit(model, data, cfg, d=d)
if d.main:
    torch.save(model.state_dict(), sys.argv[1])
distributed.teardown(d)
if os.path.isdir("/proc/self/task"):  # Linux: the threads still alive, by name
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"threads-{d.rank}.json", "w") as f:
        json.dump(sorted(n for n in names if "gloo" in n), f)
"""


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
@needs_gloo
def test_rank_slices_with_averaged_gradients_equal_the_full_batch(tmp_path):
    """Without BN the only per-rank difference is which slice of the batch it sees: exact equality (fp32)."""
    (tmp_path / "job.py").write_text(SCRIPT)
    one = _run([sys.executable, "job.py", "one.pt"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two, shown = _torchrun(["job.py", "two.pt"], tmp_path, "two")
    assert two.returncode == 0, shown
    # teardown ended the process group's gloo threads: none is left to free a collective's tensors while the
    # interpreter shuts down, which aborted a rank (SIGABRT) after a successful run on a loaded machine
    for f in sorted(tmp_path.glob("threads-*.json")):
        assert json.loads(f.read_text()) == [], f"{f.name}: gloo threads outlived teardown"
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert not torch.equal(a["0.weight"], b["0.weight"] * 0)  # trained weights, not zeros
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_gloo
def test_two_nodes_rendezvous_over_c10d_like_one_process(tmp_path):
    """Two machines, as users start them: one torchrun agent per node (--nnodes 2, c10d rendezvous at the
    first node's address), one rank each. Here both agents run on this machine, on the loopback address;
    the result must equal the one-process run, like the one-node run above."""
    (tmp_path / "job.py").write_text(SCRIPT)
    one = _run([sys.executable, "job.py", "one.pt"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if "lo" in {n for _, n in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    for attempt in range(2):  # the free port picked here may be taken before the agent binds it: once more
        port = _free_port()
        agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                    "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=edlab-test",
                                    f"--node_rank={node}", "--max_restarts=0", "job.py", "two.pt"],
                                   env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for node in (0, 1)]
        outs = [a.communicate(timeout=300) for a in agents]
        if all(a.returncode == 0 for a in agents) or attempt == 1:
            break
    assert all(a.returncode == 0 for a in agents), "\n".join(e[-3000:] for _, e in outs)
    # one job of two ranks (rank 1 exists), not two jobs of one rank each
    assert sorted(f.name for f in tmp_path.glob("threads-*.json")) == ["threads-0.json", "threads-1.json"]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
