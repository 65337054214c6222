"""A QAT training step against a float one, and edlab's one-node LSQ quantizer against the same quantizer
written with detach() (the form of LSQ's paper and most code that copies it), measured in one run.

Why: QAT was the slow stage of the challenge's pipeline. A 5/5-bit QAT epoch of the separable student took
~130 s where its float epoch took ~34 s (one thread, this project's CPU), and the profile put the time in the
elementwise passes of the quantizer over every activation (comparisons, ``where``, the autograd nodes of the
detach() trick), not in the convolutions. ``edlab.qlayers.lsq_quantize`` is one autograd node whose passes
are vectorised kernels; its forward is bit-identical to the detach() form (asserted in
tests/test_quantize.py against :func:`lsq_detach_form` below) and its gradients equal it to rounding.

The three arms (float, QAT with edlab's quantizer, QAT with the detach() form) run interleaved for
``--rounds`` rounds of ``--steps`` steps on synthetic images, batch 128, edlab's CPU arithmetic (bf16 autocast
where the CPU has native bf16, channels_last); the median of the rounds is reported, so the ratios hold on a
busy machine. Example:

    python benchmarks/bench_qat_step.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import edlab.qlayers as qlayers
from edlab.device import resolve_precision
from edlab.models import create_model
from edlab.quantize import calibrate, quantize_qat


def lsq_detach_form(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
    """LSQ written as autograd sees it in the paper's pseudo-code: gradient scaling and the round's straight
    through estimator by detach(); a dozen autograd nodes per call."""
    s = step.abs() + 1e-12
    s = s * grad_scale + (s - s * grad_scale).detach()
    q = (x / s).clamp(qn, qp)
    return (q + (q.round() - q).detach()) * s


def make_step(quantized: bool, batch: int, blocks: list[int], bits: int):
    torch.manual_seed(0)
    model = create_model("resnet20", conv="separable", blocks=blocks)
    x = torch.randn(batch, 3, 32, 32)
    if quantized:
        quantize_qat(model, bits, bits, first_last_bits=8)
        calibrate(model, x)
    model = model.to(memory_format=torch.channels_last).train()
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = resolve_precision("auto", torch.device("cpu"))

    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def timed(step, n: int, quantizer=None) -> float:
    """Seconds per step over n steps, with ``quantizer`` in place of edlab's LSQ function when given."""
    real = qlayers.lsq_quantize
    if quantizer is not None:
        qlayers.lsq_quantize = quantizer
    try:
        t = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t) / n
    finally:
        qlayers.lsq_quantize = real


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python benchmarks/bench_qat_step.py --threads 1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds, arms interleaved; the median is reported")
    p.add_argument("--bits", type=int, default=5, help="weight and activation bits of the QAT arms")
    p.add_argument("--blocks", default="2,3,3", help="the separable student's blocks per stage")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    blocks = [int(b) for b in a.blocks.split(",")]
    float_step = make_step(False, a.batch, blocks, a.bits)
    qat_step = make_step(True, a.batch, blocks, a.bits)
    arms = {"float": (float_step, None), "QAT, edlab's LSQ": (qat_step, None),
            "QAT, LSQ by detach()": (qat_step, lsq_detach_form)}
    for step, quantizer in arms.values():  # warm-up (oneDNN primitives, allocator)
        timed(step, 2, quantizer)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(a.rounds):
        for name, (step, quantizer) in arms.items():
            times[name].append(timed(step, a.steps, quantizer))
    med = {k: statistics.median(v) for k, v in times.items()}
    threads = torch.get_num_threads()
    print(f"separable student {blocks}, {a.bits}/{a.bits} bits (8-bit ends), batch {a.batch}, {threads} thread(s), "
          f"median of {a.rounds} rounds x {a.steps} steps")
    print("| arm | s/step | images/s | x float step |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {a.batch / v:.0f} | {v / med['float']:.2f} |")
    speedup = med["QAT, LSQ by detach()"] / med["QAT, edlab's LSQ"]
    print(f"edlab's LSQ step is {speedup:.2f}x faster than the detach() form")
    return {"seconds": med, "speedup": speedup}


if __name__ == "__main__":
    main()
