"""BN folding (edlab.fold): same outputs in eval mode, BN parameters gone from the score, quantized layers,
checkpoints, and `edlab quantize --fold-bn`."""

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from edlab.checkpoint import load_checkpoint, save_checkpoint
from edlab.cli import cli
from edlab.fold import fold_bn
from edlab.models import create_model
from edlab.qlayers import LSQConv2d
from edlab.quantize import binarize, calibrate, quantize_qat
from edlab.scoring import profile

pytestmark = pytest.mark.usefixtures("threads_from_env")  # (conftest)

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def trained_like(model, positive=False):
    """Random BN statistics and affine terms (negative scales too, unless ``positive``), as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g).abs() + 0.1 if positive else torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def bn_params(model):
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def test_folded_resnet_computes_the_same_and_scores_without_bn(tmp_path):
    m = trained_like(create_model("resnet20", blocks=[2, 1, 1], conv="depthwise", width=0.5))
    before = profile(m)
    folded, report = fold_bn(m)
    assert not report.kept and not any(isinstance(x, nn.BatchNorm2d) for x in folded.modules())
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # the model itself is unchanged
    assert torch.allclose(folded(X), m(X), rtol=1e-4, atol=1e-5)
    # every BN's scale + shift (2 per channel) is gone; each conv that absorbed one gained a bias per channel
    new_biases = sum(folded.get_submodule(layer).out_channels for layer, _ in report.folded)
    after = profile(folded)
    assert after.params == before.params - bn_params(m) + new_biases
    assert not [r for r in after.rows if r.type.startswith("BatchNorm")] and after.macs == before.macs
    assert after.score < before.score
    save_checkpoint(folded, tmp_path / "f.ckpt")
    back = load_checkpoint(tmp_path / "f.ckpt")
    assert torch.equal(back(X), folded(X)) and profile(back).params == after.params


def test_bns_that_do_not_follow_a_conv_are_kept():
    air = trained_like(create_model("airbench94", width=0.125))
    folded, report = fold_bn(air)
    assert {b for _, b in report.folded} == {f"layers.{i}.bn2" for i in range(3)}
    assert "not a conv/linear output" in report.kept["layers.0.bn1"]  # conv -> pool -> BN
    assert torch.allclose(folded(X), air(X), rtol=1e-4, atol=1e-6)
    pre = trained_like(create_model("preact_resnet18", width=0.125))
    folded, report = fold_bn(pre)
    assert "also read outside the BN" in report.kept["layers.0.0.bn1"]  # stem output also feeds the shortcut
    assert ("layers.0.0.conv1", "layers.0.0.bn2") in report.folded
    assert torch.allclose(folded(X), pre(X), rtol=1e-4, atol=1e-5)


def test_fold_into_lsq_layers_keeps_the_codes():
    m = trained_like(create_model("resnet20", blocks=[1, 1, 1], width=0.5), positive=True)
    quantize_qat(m, 4, 4, first_last_bits=8)
    calibrate(m, X)
    m.eval()
    layer = m.layers[0][0].conv1
    codes = (layer.effective_weight() / layer.weight_step.view(-1, 1, 1, 1)).round()
    folded, report = fold_bn(m)
    assert not report.kept
    f = folded.layers[0][0].conv1
    assert isinstance(f, LSQConv2d) and f.bias is not None
    assert torch.equal((f.effective_weight() / f.weight_step.view(-1, 1, 1, 1)).round(), codes)
    assert (folded(X).argmax(1) == m(X).argmax(1)).all()
    with torch.no_grad():
        assert torch.allclose(folded(X), m(X), rtol=1e-3, atol=1e-3 * float(m(X).abs().max()))
    rows = {r.name: r for r in profile(folded).rows}
    assert rows["layers.0.0.conv1"].bits_w == 4 and "layers.0.0.bn1" not in rows


def test_negative_scale_on_the_lowest_code_and_binary_layers_stay_unfolded():
    m = trained_like(create_model("resnet20", blocks=[1, 1, 1], width=0.5), positive=True)
    quantize_qat(m, 2, None)
    layer, bn = m.layers[0][0].conv1, m.layers[0][0].bn1
    with torch.no_grad():
        bn.weight[0] = -1.0  # channel 0 flips sign; at 2 bits it surely uses the code -2
    folded, report = fold_bn(m.eval())
    assert "negative BN scale" in report.kept["layers.0.0.bn1"]
    assert isinstance(folded.layers[0][0].bn1, nn.BatchNorm2d) and folded.layers[0][0].conv1.bias is None
    assert torch.allclose(folded(X), m(X), rtol=1e-4, atol=1e-5)
    assert layer.weight_step.shape[0] == layer.out_channels
    b = binarize(trained_like(create_model("resnet20", blocks=[1, 1, 1], width=0.5)))
    _, report = fold_bn(b)
    assert "BinaryConnect" in report.kept["layers.0.0.bn1"]


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_quantize_fold_bn_cli(tiny_ckpt, tmp_path):
    """--fold-bn on qat folds after the fine-tuning: the tested, scored and saved model is the folded one."""
    r = CliRunner().invoke(cli, ["quantize", str(tiny_ckpt), "--method", "qat", "--bits-w", "4",
                                 "--first-last-bits", "8", "--fold-bn", "--epochs", "1",
                                 "--set", "data.train_subset=64", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    back = load_checkpoint(tmp_path / "q" / "model.ckpt")
    kept = s["options"]["fold_bn"]["kept"]
    assert s["options"]["fold_bn"]["folded"] > len(kept)
    assert sorted(n for n, x in back.named_modules() if isinstance(x, nn.BatchNorm2d)) == sorted(kept)
    assert isinstance(back.layers[0][0].conv1, LSQConv2d) and back.layers[0][0].conv1.bias is not None
    assert profile(back).score == pytest.approx(s["score"])
    assert len([row for row in s["rows"] if row["type"].startswith("BatchNorm")]) == len(kept)


@pytest.mark.slow  # among the slowest on 2 cores: CI runs it (scripts/test.sh), the default suite not
@pytest.mark.filterwarnings("ignore:structured pruning")
def test_folding_a_pruned_model_does_not_pass_for_structured_pruning():
    from edlab.prune import prune_structured
    from edlab.scoring import dense_reference

    m = trained_like(create_model("resnet20", blocks=[1, 1, 1], width=0.5))
    m.edlab_dense_reference = dense_reference(m)
    folded, _ = fold_bn(m)
    assert profile(folded).ps == 0 and profile(folded).params < profile(m).params
    prune_structured(m, 0.3, X[:1])
    ps = profile(m).ps
    assert ps > 0.1
    assert profile(fold_bn(m)[0]).ps == pytest.approx(ps, abs=0.02)  # the folded dense net is the new basis


def test_qat_then_fold_then_pack(tmp_path):
    """The deployment form end to end: quantize (mixed bits), fold, pack. The BNs fold_bn keeps (negative scales
    on the lowest code) are the ones the packer stores as scale and shift; the packed file reloads with the same
    predictions and score."""
    from edlab.pack import pack, read_pack_header, unpack_model

    m = trained_like(create_model("resnet20", blocks=[1, 1, 1], conv="depthwise", width=0.5))
    quantize_qat(m, 4, 4, layer_bits="first=8,last=8")
    calibrate(m, X)
    folded, report = fold_bn(m.eval())
    assert report.folded
    save_checkpoint(folded, tmp_path / "q.ckpt")
    sizes = pack(tmp_path / "q.ckpt", tmp_path / "q.pack")
    assert sorted(read_pack_header(tmp_path / "q.pack")["bn_folded"]) == sorted(report.kept)
    back = unpack_model((tmp_path / "q.pack").read_bytes())
    with torch.no_grad():
        assert (back(X).argmax(1) == folded(X).argmax(1)).all()
        assert sizes["max_output_difference"] < 1e-3 * max(1.0, float(folded(X).abs().max()))
    assert profile(back).score == pytest.approx(profile(folded).score)
