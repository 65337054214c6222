"""benchmarks/bench_qat_step.py: edlab's one-node LSQ quantizer against the detach() form it replaced. The
quantizer must compute the same codes bit for bit (models trained or packed before keep their accuracy) and the
same gradients to rounding; the script must print its three arms and the ratio."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edlab.qlayers import lsq_quantize

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_qat_step.py"


def detach_form():
    spec = importlib.util.spec_from_file_location("bench_qat_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.lsq_detach_form


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,step_shape,bounds", [((16, 8, 6, 6), (), (0, 31)), ((16, 8, 6, 6), (), (-16, 15)),
                                                     ((12, 4, 3, 3), (12, 1, 1, 1), (-16, 15)),
                                                     ((6, 10), (6, 1), (-4, 3))])
def test_one_node_lsq_equals_the_detach_form(dtype, shape, step_shape, bounds):
    reference = detach_form()
    qn, qp = bounds
    torch.manual_seed(0)
    step0 = torch.rand(step_shape) * 0.2 + 0.05
    if step_shape:
        step0[0] *= -1  # a step pushed below zero acts as its magnitude; its gradient flips sign
    x0 = (torch.randn(shape) * 2).to(dtype)
    s = step0.abs().reshape(step_shape) if step_shape else step0.abs()
    x0.view(-1)[:4] = (torch.tensor([qn, qp, qn - 1, qp + 1]) * s.reshape(-1)[0]).to(dtype)  # on the bounds
    g = torch.randn(shape).to(dtype)
    got = []
    for f in (reference, lsq_quantize):
        x, step = x0.clone().requires_grad_(), step0.clone().requires_grad_()
        y = f(x, step, qn, qp, 0.01)
        (y * g).sum().backward()
        got.append((y.detach(), x.grad, step.grad))
    (y_ref, gx_ref, gs_ref), (y, gx, gs) = got
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)  # the same codes, bit for bit
    with torch.no_grad():
        assert torch.equal(lsq_quantize(x0, step0, qn, qp, 0.01), y_ref)  # the path without a gradient too
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # the detach form rounds g * s / s and sums in bf16
    assert (gx - gx_ref).abs().max() <= tol * g.abs().max()
    assert (gx == 0).sum() == (gx_ref == 0).sum()  # the same elements clipped, the bounds included
    torch.testing.assert_close(gs, gs_ref, rtol=tol, atol=tol * gs_ref.abs().max().item())


def test_the_benchmark_prints_its_three_arms_and_the_ratio():
    r = subprocess.run([sys.executable, str(SCRIPT), "--batch", "8", "--steps", "1", "--rounds", "1",
                        "--blocks", "1,1,1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for arm in ("| float |", "| QAT, edlab's LSQ |", "| QAT, LSQ by detach() |"):
        assert arm in r.stdout
    assert "x faster than the detach() form" in r.stdout
