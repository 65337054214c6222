"""Mixed per-layer bit-widths in QAT: the plan, the score's exact count, checkpoints, the CLI."""

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from edlab.checkpoint import load_checkpoint, save_checkpoint
from edlab.cli import cli
from edlab.models import create_model
from edlab.qlayers import LSQConv2d
from edlab.quantize import calibrate, layer_bits_plan, parse_layer_bits, quantize_qat
from edlab.scoring import REF_MACS, REF_PARAMS, profile

pytestmark = pytest.mark.usefixtures("threads_from_env")  # (conftest)

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
RULES = "first=8,last=8/32,layers.1.0.shortcut.0=float,layers.2.*=2/4"
# What RULES gives a resnet20 with blocks [1, 1, 1] quantized at 3-bit weights / 4-bit activations: written
# out by hand, (weight bits, activation bits); None = float (32).
EXPECTED = {
    "conv1": (8, 8),
    "layers.0.0.conv1": (3, 4), "layers.0.0.conv2": (3, 4),
    "layers.1.0.conv1": (3, 4), "layers.1.0.conv2": (3, 4), "layers.1.0.shortcut.0": (None, None),
    "layers.2.0.conv1": (2, 4), "layers.2.0.conv2": (2, 4), "layers.2.0.shortcut.0": (2, 4),
    "fc": (8, None),
}


def mixed_model():
    torch.manual_seed(0)
    m = quantize_qat(create_model("resnet20", blocks=[1, 1, 1], width=0.5), 3, 4, layer_bits=RULES)
    calibrate(m, X)
    return m.eval()


def test_rules_parse_and_first_match_wins():
    assert parse_layer_bits("conv1=8, fc=8/32 ,layers.*=float") == [("conv1", 8, 8), ("fc", 8, None),
                                                                   ("layers.*", None, None)]
    assert parse_layer_bits({"first": 6, "last": "4/8"}) == [("first", 6, 6), ("last", 4, 8)]
    m = create_model("resnet20", blocks=[1, 1, 1], conv="depthwise")
    plan = layer_bits_plan(m, 4, 4, layer_bits="layers.2.*=3,*.conv1.0=float")
    assert plan["layers.2.0.conv1.0"] == (3, 3)  # the first rule that matches
    assert plan["layers.1.0.conv1.0"] is None and plan["layers.1.0.conv1.3"] == (4, 4)
    assert plan["conv1"] is None and plan["fc"] is None  # keep_first_last: ends float unless a rule says
    assert layer_bits_plan(m, 4, 4, keep_first_last=False)["fc"] == (4, 4)
    assert layer_bits_plan(m, 4, 4, first_last_bits=8)["conv1"] == (8, 8)


def test_mixed_model_score_is_the_hand_sum_of_its_layers():
    m = mixed_model()
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert set(layers) == set(EXPECTED)
    for name, (bw, ba) in EXPECTED.items():
        if bw is None:
            assert type(layers[name]) is nn.Conv2d
        else:
            assert (layers[name].weight_bits, layers[name].act_bits) == (bw, ba)
    macs = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: macs.__setitem__(
        n, o[0].numel() * mod.weight[0].numel())) for n, mod in layers.items()]  # outputs x taps
    m(X[:1])
    for h in hooks:
        h.remove()
    bits_params = 0
    for name, mod in m.named_modules():  # every stored tensor: weights at their bits, the rest 32 bits
        for pname, p in mod.named_parameters(recurse=False):
            bw = EXPECTED.get(name, (None,))[0] if pname == "weight" else None
            bits_params += p.numel() * (bw or 32)  # LSQ step sizes are stored: 32 bits each
    ops = sum(macs[n] * max(bw or 32, ba or 32) for n, (bw, ba) in EXPECTED.items())
    p = profile(m)
    assert p.score_params_term == pytest.approx(bits_params / 32 / REF_PARAMS, rel=1e-12)
    assert p.score_ops_term == pytest.approx(ops / 32 / REF_MACS, rel=1e-12)
    assert p.macs == sum(macs.values())
    rows = {r.name: r for r in p.rows}
    assert (rows["layers.2.0.conv1"].bits_w, rows["layers.2.0.conv1"].bits_a) == (2, 4)
    assert (rows["fc"].bits_w, rows["fc"].bits_a) == (8, 32)


def test_mixed_model_reloads_with_its_bits(tmp_path):
    m = mixed_model()
    save_checkpoint(m, tmp_path / "mixed.ckpt")
    back = load_checkpoint(tmp_path / "mixed.ckpt")
    bits = {n: (getattr(x, "weight_bits", None), getattr(x, "act_bits", None)) for n, x in back.named_modules()
            if isinstance(x, (nn.Conv2d, nn.Linear))}
    assert bits == EXPECTED
    assert torch.equal(back(X), m(X)) and profile(back).score == profile(m).score


def test_quantize_cli_layer_bits(tiny_ckpt, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(tiny_ckpt), "--method", "qat", "--bits-w", "4", "--epochs", "1",
                                 "--layer-bits", "first=8,last=8,layers.2.*=2/4", "--set", "data.train_subset=64",
                                 "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert s["options"]["layer_bits"] == "first=8,last=8,layers.2.*=2/4"
    rows = {row["name"]: row for row in s["rows"]}
    assert rows["conv1"]["bits_w"] == 8 and rows["layers.2.0.conv1"]["bits_w"] == 2
    assert rows["layers.0.0.conv1"]["bits_w"] == 4 and rows["fc"]["bits_w"] == 8
    back = load_checkpoint(tmp_path / "q" / "model.ckpt")
    assert isinstance(back.layers[2][0].conv2, LSQConv2d) and back.layers[2][0].conv2.act_bits == 4
    assert profile(back).score == pytest.approx(s["score"])


@pytest.mark.parametrize("args,msg", [
    (["--method", "qat", "--layer-bits", "nosuch*=4"], "'nosuch*' matches no conv/linear layer"),
    (["--method", "qat", "--layer-bits", "conv1=eight"], "is not PATTERN=BITS"),
    (["--method", "qat", "--layer-bits", "conv1=1"], "weight bits must be an integer from 2 to 16"),
    (["--method", "bf16", "--layer-bits", "conv1=8"], "--layer-bits is a qat option"),
])
def test_bad_layer_bits_are_one_line(tiny_ckpt, args, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["quantize", str(tiny_ckpt), *args])
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before the data and the run folder
