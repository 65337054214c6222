"""The depthwise challenge student (configs/student-dw233-distill.yaml: resnet20 blocks [2, 3, 3], depthwise
convs, widths 16/32/64): edlab's training step as ``fit`` takes it vs a plain fp32 PyTorch loop, in one run.

Both sides train on random tensors of CIFAR shape (SGD momentum 0.9, cross-entropy); edlab's side uses what
``fit`` resolves on this host (``precision: auto`` -> bf16 on AMX/AVX512-BF16, channels_last with bf16,
no decay on BN/bias). Variants that may be faster on a CPU are timed too: channels_last on/off, batch 256,
torch.compile (skipped with a line if it fails). Each line: img/s and the ratio to the plain loop.

    python benchmarks/bench_student.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from edlab.config import OptimConfig
from edlab.device import autocast, host, resolve_channels_last, resolve_precision
from edlab.models import create_model
from edlab.optim import build_optimizer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "student-dw233-distill.yaml"


def student(conv: str | None = None) -> nn.Module:
    m = (yaml.safe_load(CONFIG.read_text()) or {}).get("model", {})
    torch.manual_seed(0)
    return create_model(m.get("name", "resnet20"), 10, width=m.get("width", 1.0),
                        conv=conv or m.get("conv", "depthwise"), blocks=m.get("blocks", [2, 3, 3]))


class Arm:
    """One way of training the student: its model, optimizer and fixed batch, built once so that the rounds
    time only steps."""

    def __init__(self, edlab: bool, batch: int, channels_last: str = "auto", compile_: bool = False,
                 conv: str | None = None):
        dev = torch.device("cpu")
        self.model = student(conv)
        self.amp = resolve_precision("auto", dev) if edlab else None
        cl = resolve_channels_last(channels_last, dev, self.amp) if edlab else channels_last == "on"
        fmt = torch.channels_last if cl else torch.contiguous_format
        self.model.to(memory_format=fmt).train()
        if edlab:
            self.opt = build_optimizer(self.model, OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4))
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.fwd = torch.compile(self.model) if compile_ else self.model
        self.x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 10, (batch,))
        self.rates: list[float] = []

    def step(self) -> None:
        with autocast(torch.device("cpu"), self.amp):
            loss = nn.functional.cross_entropy(self.fwd(self.x).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def time(self, steps: int) -> None:
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.rates.append(len(self.y) * steps / (time.perf_counter() - t))

    def median(self) -> float:
        return statistics.median(self.rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="steps per arm per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each times every arm once, in turn")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--separable", action="store_true",
                   help="also time the CPU-shaped student: conv separable (no BN + ReLU inside the factorized conv)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    amp = resolve_precision("auto", torch.device("cpu"))
    print(f"host: {host()['kind']}  (oneDNN bf16: {'yes' if amp else 'no'}; edlab's auto precision: "
          f"{'bf16' if amp else 'fp32'})  threads {a.threads}  batch {a.batch_size}; median img/s of "
          f"{a.rounds} rounds of {a.steps} steps, the arms interleaved (a load that comes and goes hits all)")
    b = a.batch_size
    arms = {f"plain fp32 loop, NCHW, batch {b}": dict(edlab=False, batch=b, channels_last="off"),
            f"edlab step (auto), batch {b}": dict(edlab=True, batch=b),
            f"edlab step, channels_last on, batch {b}": dict(edlab=True, batch=b, channels_last="on"),
            f"edlab step, channels_last off, batch {b}": dict(edlab=True, batch=b, channels_last="off"),
            f"plain fp32 loop, channels_last, batch {b}": dict(edlab=False, batch=b, channels_last="on"),
            f"edlab step (auto), batch {2 * b}": dict(edlab=True, batch=2 * b)}
    if a.separable:
        arms[f"edlab step (auto), conv separable, batch {b}"] = dict(edlab=True, batch=b, conv="separable")
    if not a.no_compile:
        arms[f"edlab step (auto) + torch.compile, batch {b}"] = dict(edlab=True, batch=b, compile_=True)
    built = {}
    for name, kw in arms.items():
        try:
            arm = Arm(**kw)
            for _ in range(a.warmup):
                arm.step()
            built[name] = arm
        except Exception as e:  # torch.compile without a compiler, etc.
            print(f"{name:44} skipped: {type(e).__name__}: {str(e).strip().splitlines()[0][:80] if str(e) else ''}")
    for _ in range(a.rounds):
        for arm in built.values():
            arm.time(a.steps)
    base = next(iter(built.values())).median()
    print(f"{'variant':44} {'img/s':>8}  ratio  (min-max img/s)")
    for name, arm in built.items():
        print(f"{name:44} {arm.median():8.0f}  x{arm.median() / base:.2f}  ({min(arm.rates):.0f}-{max(arm.rates):.0f})")


if __name__ == "__main__":
    main()
