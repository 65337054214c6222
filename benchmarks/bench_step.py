"""Micro-benchmark of one resnet20 training step on the CPU: fp32 vs bf16 autocast, NCHW vs channels_last.

Why: edlab's `precision: auto` turns on bf16 + channels_last where oneDNN has native bf16 kernels; this
shows the gain on the machine at hand (batch 128, synthetic tensors, 10 timed steps after 3 warm-up).

    python benchmarks/bench_step.py
"""

import time

import torch
import torch.nn.functional as F

from edlab.models import create_model


def images_per_s(amp: torch.dtype | None, channels_last: bool, batch: int = 128, steps: int = 10) -> float:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model("resnet20").to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


if __name__ == "__main__":
    base = None
    for amp, cl in [(None, False), (None, True), (torch.bfloat16, False), (torch.bfloat16, True)]:
        ips = images_per_s(amp, cl)
        base = base or ips
        name = "bf16" if amp else "fp32"
        print(f"{name:5} {'channels_last' if cl else 'NCHW':14} {ips:7.0f} img/s  x{ips / base:.2f}")
