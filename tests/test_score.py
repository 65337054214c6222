"""The score is counted from the model: known counts, the formula, pruning, bits, and the MicroNet rules."""

import dataclasses
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from rich.console import Console

from edlab.errors import EdlabError
from edlab.layers import DepthwiseSeparable, LayerNorm2d
from edlab.models import create_model
from edlab.score_table import render
from edlab.scoring import RULES, dense_reference, profile, score, what_if_table

SUMMARY = {"score", "score_params_term", "score_ops_term", "params", "nonzero_params", "macs"}
SUMMARY |= {"bits_w", "bits_a", "ps", "pu"}


@pytest.fixture(scope="module")
def resnet20():
    return profile(create_model("resnet20"))


def _mask_half(model: nn.Module) -> None:
    """Zero the smaller half (by magnitude) of every conv/linear weight: unstructured pruning."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0


def test_resnet18_counts_and_course_scores():
    model = create_model("resnet18")
    p = profile(model)
    assert (p.params, p.macs) == (11_173_962, 555_422_720)
    assert p.nonzero_params > 11_173_900  # a random init may hold an exact zero or two
    assert (p.bits_w, p.bits_a, p.ps) == (32, 32, 0) and p.pu < 1e-5
    assert round(p.score, 4) == 3.9790
    half = profile(model.half())  # on CPU traced with bf16 stand-ins; bits still read from the fp16 model
    assert (half.params, half.macs, half.bits_w, half.bits_a) == (11_173_962, 555_422_720, 16, 16)
    assert round(half.score, 4) == 1.9895
    assert next(model.parameters()).dtype == torch.float16


def test_formula_vectors():
    assert score(1_561_674, 78_943_232, qw=16, qa=16) == pytest.approx(0.280405, abs=5e-7)
    assert score(4_903_242, 254_907_392, qw=16, qa=16) == pytest.approx(0.892981, abs=5e-7)
    assert score(1_438_117, 74_575_872, qw=16, qa=16) == pytest.approx(0.261575, abs=5e-7)
    assert score(11_173_962, 555_422_720) == pytest.approx(3.97900, abs=5e-6)


@pytest.mark.parametrize("kwargs", [{"ps": 0.6, "pu": 0.4}, {"ps": -0.1}, {"qw": 0}, {"w": 0}])
def test_formula_rejects_invalid_inputs(kwargs):
    args = {"w": 1000, "f": 1000} | kwargs
    with pytest.raises(EdlabError):
        score(**args)


def test_cifar_resnet20_counts(resnet20):
    assert (resnet20.params, resnet20.macs) == (272_474, 40_813_184)
    assert resnet20.score == pytest.approx(272_474 / 5.6e6 + 40_813_184 / 2.8e8)
    assert resnet20.formula_view["score"] == pytest.approx(resnet20.score)


def test_torchvision_imagenet_resnet18_macs():
    torchvision = pytest.importorskip("torchvision")
    p = profile(torchvision.models.resnet18(), input_size=(3, 224, 224))
    assert p.macs == 1_814_073_344
    assert p.params == 11_689_512


def test_depthwise_and_grouped_macs_are_analytic():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False),  # 8*6*6 outputs x (4/2)*9 taps = 5184
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # 8*3*3 x 9 = 648
        nn.Conv2d(8, 16, 1, bias=False),  # 16*3*3 x 8 = 1152
        nn.Flatten(),
        nn.Linear(144, 10),  # 1440
    )
    p = profile(model, input_size=(4, 6, 6))
    assert [r.macs for r in p.rows] == [5184, 648, 1152, 1440]
    assert p.params == 8 * 2 * 9 + 8 * 9 + 16 * 8 + 1450
    block = DepthwiseSeparable(16, 32, stride=2)  # dw 16*4*4*9 + pw 32*4*4*16
    b = profile(block, input_size=(16, 8, 8))
    assert b.macs == 16 * 16 * 9 + 32 * 16 * 16
    assert b.params == 16 * 9 + 2 * 16 + 16 * 32


def test_any_module_counts_from_the_ops_it_executes():
    class Custom(nn.Module):  # no nn.Conv2d/nn.Linear inside: parameters used through functional calls
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
            self.proj = nn.Parameter(torch.randn(6, 5))

        def forward(self, x):
            x = F.conv2d(x, self.w, padding=1)  # 6*8*8 x 27
            return F.adaptive_avg_pool2d(x, 1).flatten(1) @ self.proj  # 6*5

    p = profile(Custom(), input_size=(3, 8, 8))
    assert p.macs == 6 * 8 * 8 * 27 + 30
    assert p.params == 6 * 27 + 30


def test_unstructured_zeros_halve_the_params_term_only(resnet20):
    model = create_model("resnet20")
    _mask_half(model)
    p = profile(model)
    kept = 0
    for m in model.modules():
        for name, t in m.named_parameters(recurse=False):
            prunable = name == "weight" and isinstance(m, (nn.Conv2d, nn.Linear))
            kept += int(torch.count_nonzero(t)) if prunable else t.numel()
    assert (p.params, p.nonzero_params) == (272_474, kept)
    assert p.score_params_term == pytest.approx(kept / 5.6e6, rel=1e-12)
    assert p.score_params_term == pytest.approx(resnet20.score_params_term / 2, rel=0.02)
    assert p.score_ops_term == resnet20.score_ops_term
    assert p.ps == 0 and p.pu == pytest.approx((272_474 - kept) / 272_474)
    assert p.formula_view["score"] == pytest.approx(p.score)


def test_torch_prune_masks_are_seen():
    lin = nn.Linear(20, 10)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    p = profile(lin, input_size=(20,))
    assert (p.params, p.nonzero_params) == (210, 110)


def test_physically_removed_channels_report_ps_without_double_counting(resnet20):
    small = create_model("resnet20", width=0.5)
    p = profile(small, dense=resnet20)
    assert p.ps == pytest.approx(1 - p.params / resnet20.params) and p.ps > 0.7
    assert p.score_params_term == pytest.approx(p.params / 5.6e6)
    assert p.score_ops_term == pytest.approx(p.macs / 2.8e8)  # counted MACs, not counted * (1 - ps)
    assert p.score_params_term < resnet20.score_params_term and p.score_ops_term < resnet20.score_ops_term
    view = p.formula_view
    assert (view["w"], view["f"]) == (272_474, 40_813_184)
    assert view["params_term"] == pytest.approx(p.score_params_term, rel=1e-12)
    assert view["ps_macs"] == pytest.approx(1 - p.macs / 40_813_184)
    small.edlab_dense_reference = dense_reference(create_model("resnet20"))
    assert profile(small).ps == p.ps


def test_bits_come_from_the_model_state():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 10)
    )
    model[0].weight_bits = 1
    model[3].act_bits = 8
    p = profile(model, input_size=(3, 8, 8))
    conv, bn, fc = p.rows
    assert (conv.bits_w, conv.bits_a, bn.bits_w, fc.bits_w, fc.bits_a) == (1, 32, 32, 32, 8)
    assert conv.params_term == pytest.approx(216 / 32 / 5.6e6)
    assert conv.ops_term == pytest.approx(conv.macs / 2.8e8)  # max(1, 32) / 32
    assert fc.ops_term == pytest.approx(fc.macs / 2.8e8)  # max(32, 8) / 32
    wrapper = nn.Sequential(nn.Conv2d(3, 4, 3))
    wrapper.weight_bits = 4  # a wrapper (or the whole model) declares bits for what it contains
    inner = profile(wrapper, input_size=(3, 8, 8)).rows[0]
    assert (inner.name, inner.bits_w, inner.bits_a) == ("0", 4, 32)
    bf16 = profile(create_model("resnet20").bfloat16())
    assert (bf16.bits_w, bf16.bits_a) == (16, 16)
    what_if = profile(create_model("resnet20"), bits_w=4, bits_a=8)
    assert (what_if.bits_w, what_if.bits_a) == (4, 8)
    # an initialisation may hold an exact 0.0 weight, which is (rightly) not credited: compare nonzero counts
    assert what_if.score == pytest.approx(score(what_if.nonzero_params, 40_813_184, qw=4, qa=8))


def test_profiling_leaves_the_model_untouched():
    model = create_model("resnet20")
    model.layers[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    profile(model)
    profile(model, rules="micronet")
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_micronet_counts_a_linear_layer_by_hand():
    lin = nn.Linear(100, 10)
    p = profile(lin, input_size=(100,), rules="micronet")
    # fp32, nothing below 16 bits: the 16-bit freebie; 1000 mults at 16/32, 990 + 10 (bias) adds at 32/32.
    assert p.score_params_term == pytest.approx(1010 * 16 / 32 / 36.5e6)
    assert p.ops == 2000 and p.score_ops_term == pytest.approx((1000 * 0.5 + 1000) / 10.49e9)
    with torch.no_grad():
        lin.weight[:, :50] = 0
    p = profile(lin, input_size=(100,), rules="micronet")  # nonzeros + a 1-bit mask; zero mults skipped
    assert p.score_params_term == pytest.approx((500 * 16 + 1000 + 10 * 16) / 32 / 36.5e6)
    assert p.score_ops_term == pytest.approx((500 * 0.5 + 490 + 10) / 10.49e9)
    lin.weight_bits = 8  # below 16 bits: no freebie, the fp32 bias and activations count 32 bits
    p = profile(lin, input_size=(100,), rules="micronet")
    assert p.score_params_term == pytest.approx((500 * 8 + 1000 + 10 * 32) / 32 / 36.5e6)
    assert p.score_ops_term == pytest.approx((500 * 1 + 500) / 10.49e9)
    lin.act_bits = 8
    p = profile(lin, input_size=(100,), rules="micronet")
    assert p.score_ops_term == pytest.approx((500 * 8 / 32 + 500) / 10.49e9)


def test_micronet_differs_and_folds_batchnorm(resnet20):
    model = create_model("resnet20")
    p = profile(model, rules="micronet")
    bn = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert p.params == 272_474 - bn  # each BN keeps only its shift, as the bias of the conv before it
    assert p.macs == resnet20.macs and p.ops > 2 * p.macs - 100_000
    assert p.score != resnet20.score and p.formula_view is None
    assert "micronet" in p.rules_description


@pytest.mark.parametrize("norm, groups, n", [(LayerNorm2d(8), 16, 8), (nn.GroupNorm(2, 8), 2, 4 * 16)])
def test_layer_and_group_norm_are_norm_layers_counted_by_hand(norm, groups, n):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), norm)  # 8 channels on a 4x4 map: 128 elements
    p = profile(model, input_size=(3, 4, 4))
    assert p.params == p.arch_params == 3 * 8 + 8 + 16 and p.macs == 3 * 128 and not p.notes  # f: MACs only
    # per group of n: mean (n - 1 adds, 1 mult), centring (n adds), variance (n mults, n - 1 adds, 1 mult),
    # eps + rsqrt (1 add, 1 mult), normalising (n mults); per element the scale and shift (1 mult, 1 add)
    mults, adds = groups * (2 * n + 3) + 128, groups * (3 * n - 1) + 128
    micro = {r.name: r for r in profile(model, input_size=(3, 4, 4), rules="micronet").rows}
    assert micro["1"].ops == mults + adds and micro["1"].params == 16  # never folded into the conv
    bn_rule = dataclasses.replace(RULES["course"], ops=frozenset({"bn"}))
    assert profile(model, input_size=(3, 4, 4), rules=bn_rule).ops == 3 * 128 + max(mults, adds)


def test_selectable_counting_options(resnet20):
    course = RULES["course"]
    model = create_model("resnet20")
    scales = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    folded = profile(model, rules=dataclasses.replace(course, bn="fold"))
    assert folded.params == 272_474 - scales == 272_474 - 784
    residual = profile(model, rules=dataclasses.replace(course, ops=frozenset({"eltwise"})))
    assert residual.ops - residual.macs == 3 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8)
    no_bias = profile(model, rules=dataclasses.replace(course, biases=False))
    assert no_bias.params == 272_474 - 784 - 10  # BN shifts and the classifier bias


def test_what_if_table_matches_the_formula():
    rows = what_if_table(1_000_000, 50_000_000, [0.0, 0.5], [0.0, 0.6], [32, (8, 16)])
    assert len(rows) == 6  # ps = 0.5 with pu = 0.6 is skipped
    r = next(r for r in rows if (r["ps"], r["pu"], r["qw"], r["qa"]) == (0.5, 0.0, 8, 16))
    assert r["score"] == pytest.approx(score(1_000_000, 50_000_000, 0.5, 0.0, 8, 16))


def test_render_and_json(resnet20):
    out = io.StringIO()
    render(resnet20, Console(file=out, width=200))
    text = out.getvalue()
    for needle in ("layers.0.0.conv1", "score = 0.1944", "formula view", "rules: course"):
        assert needle in text
    d = resnet20.to_dict()
    assert SUMMARY <= set(d) and list(d)[:3] == ["score", "score_params_term", "score_ops_term"]
    assert json.loads(json.dumps(d))["macs"] == 40_813_184


def test_ops_it_cannot_count_are_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(4), nn.Softmax(-1))
    p = profile(model, input_size=(4,))
    assert p.macs == 16
    assert any("_prelu_kernel" in n and "_softmax" in n for n in p.notes)
    assert any("4 parameters outside" in n for n in p.notes)  # PReLU's, not conv/linear/norm


def test_user_errors_are_edlab_errors():
    with pytest.raises(EdlabError, match="unknown rules"):
        profile(nn.Linear(4, 2), input_size=(4,), rules="imagenet")
    with pytest.raises(EdlabError, match="cannot trace"):
        profile(nn.Linear(4, 2), input_size=(5,))
    with pytest.raises(EdlabError, match="dense reference"):
        profile(nn.Linear(4, 2), input_size=(4,), dense={"params": 10})
