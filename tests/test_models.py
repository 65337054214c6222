import pytest
import torch
import torch.nn as nn

from edlab import EdlabError, create_model, list_models
from edlab.layers import DepthwiseSeparable


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_reference_parameter_counts():
    assert n_params(create_model("resnet18")) == 11_173_962
    assert n_params(create_model("resnet20")) == 272_474  # 1x1-conv (option B) shortcuts


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "preact_resnet18", "resnet50"])
def test_forward_shapes(name):
    m = create_model(name, num_classes=100).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_registry_lists_the_zoo():
    assert {"resnet18", "resnet34", "resnet50", "preact_resnet18", "resnet20", "resnet110"} <= set(list_models())


def test_depthwise_and_grouped_convs():
    dw = create_model("resnet20", conv="depthwise")
    assert any(isinstance(m, DepthwiseSeparable) for m in dw.modules())
    assert n_params(dw) < n_params(create_model("resnet20"))
    g4 = create_model("resnet18", conv="grouped:4")
    groups = {m.groups for m in g4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    assert groups == {1, 4}  # the stem stays standard
    mixed = create_model("resnet20", conv="standard,depthwise,grouped:2")
    assert isinstance(mixed.layers[1][0].conv1, DepthwiseSeparable)
    assert mixed.layers[2][0].conv1.groups == 2
    assert mixed(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_width_multiplier_scales_channels():
    m = create_model("resnet20", width=2)
    assert m.conv1.out_channels == 32 and m.fc.in_features == 128


@pytest.mark.parametrize("kwargs,msg", [
    ({"conv": "grouped:3"}, "power of two"),
    ({"conv": "fancy"}, "unknown conv kind"),
    ({"conv": "standard,depthwise"}, "one per stage"),
    ({"width": -1}, "width"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_model_options_are_one_clear_error(kwargs, msg):
    with pytest.raises(EdlabError, match=msg):
        create_model("resnet20", **kwargs)


def test_unknown_model_lists_choices():
    with pytest.raises(EdlabError, match="resnet20"):
        create_model("resnet99")


def test_airbench_net_shape_cost_and_factorization():
    """The airbench-class net: widths 64/256/256 (1,972,792 params), ~0.12 GMACs, pools down to 1x1."""
    from edlab import profile

    m = create_model("airbench94").eval()
    assert n_params(m) == 1_972_792
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert profile(m).macs == 118_147_360
    half = create_model("airbench94", width=0.5, conv="grouped:2")
    assert n_params(half) < n_params(m) / 4
    assert any(getattr(c, "groups", 1) == 2 for c in half.modules() if isinstance(c, nn.Conv2d))
    with pytest.raises(EdlabError, match="one per stage"):
        create_model("airbench94", conv="standard,depthwise")


def _dw_sep(cin: int, cout: int) -> int:
    """Depthwise 3x3 (9 per input channel) + its BN (2 per channel) + pointwise 1x1."""
    return 9 * cin + 2 * cin + cin * cout


def test_small_student_blocks_depthwise_counted_by_hand(tmp_path):
    """The challenge's student: blocks [2, 3, 3], widths 16/32/64, depthwise blocks. Its parameter count,
    summed here layer by layer, is what the score counts, and it survives a checkpoint round trip."""
    from edlab.checkpoint import load_checkpoint, save_checkpoint
    from edlab.scoring import profile

    def block(cin, cout):  # conv1 + bn1 + conv2 + bn2 (+ 1x1 shortcut + BN when the shape changes)
        return _dw_sep(cin, cout) + 2 * cout + _dw_sep(cout, cout) + 2 * cout + \
            (cin * cout + 2 * cout if cin != cout else 0)

    stem = 3 * 16 * 9 + 2 * 16
    stages = 2 * block(16, 16) + block(16, 32) + 2 * block(32, 32) + block(32, 64) + 2 * block(64, 64)
    fc = 64 * 10 + 10
    m = create_model("resnet20", blocks=[2, 3, 3], conv="depthwise")
    assert [len(s) for s in m.layers] == [2, 3, 3]
    p = profile(m)
    assert p.params == stem + stages + fc == n_params(m)
    # MACs of the stem and classifier by hand, the blocks' share from the per-layer rows
    rows = {r.name: r for r in p.rows}
    assert rows["conv1"].macs == 32 * 32 * 16 * 27 and rows["fc"].macs == 640
    path = save_checkpoint(m, tmp_path / "s.ckpt")
    back = load_checkpoint(path)
    assert back.edlab_spec["options"] == {"blocks": [2, 3, 3], "conv": "depthwise"}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), m.eval()(x)) and profile(back).score == p.score


def test_blocks_combine_with_width_and_grouped_convs():
    m = create_model("resnet32", blocks=[1, 2, 1], width=0.5, conv="grouped:2")
    assert [len(s) for s in m.layers] == [1, 2, 1]
    assert {c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)} == {8, 16, 32}
    assert {c.groups for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)} == {1, 2}
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert n_params(create_model("resnet20", blocks="2,3,3")) == n_params(create_model("resnet20", blocks=[2, 3, 3]))


@pytest.mark.parametrize("blocks", [[2, 3], [2, 0, 3], ["a", 1, 1], [1.5, 1, 1]])
def test_bad_blocks_are_one_clear_error(blocks):
    with pytest.raises(EdlabError, match="blocks: give 3 positive integers"):
        create_model("resnet20", blocks=blocks)


def test_channels_replace_the_stage_widths_before_width_scales_them():
    """channels moves capacity between resolutions: [12, 32, 72] instead of resnet20's 16/32/64."""
    m = create_model("resnet20", blocks=[1, 1, 2], channels=[12, 32, 72], conv="separable")
    assert [m.conv1.out_channels] + [s[-1].conv2[1].out_channels for s in m.layers] == [12, 12, 32, 72]
    half = create_model("resnet20", blocks=[1, 1, 1], channels="12,32,72", width=0.5)
    assert {c.out_channels for c in half.modules() if isinstance(c, nn.Conv2d)} == {6, 16, 36}
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    back = create_model("convnext_nano", channels=[24, 48])  # the ConvNeXt family takes it too
    assert back.fc.in_features == 48


@pytest.mark.parametrize("channels", [[16, 32], [16, 0, 64], ["a", 32, 64], [16.5, 32, 64]])
def test_bad_channels_are_one_clear_error(channels):
    with pytest.raises(EdlabError, match="channels: give 3 positive integers"):
        create_model("resnet20", channels=channels)


def test_small_student_from_a_config(tiny_cfg, tmp_path):
    from edlab.checkpoint import load_checkpoint, save_checkpoint
    from edlab.train import model_from_config

    cfg = tiny_cfg(**{"model.blocks": "[1,2,1]", "model.conv": "depthwise"})
    m = model_from_config(cfg, 10)
    assert [len(s) for s in m.layers] == [1, 2, 1] and m.edlab_spec["options"]["blocks"] == [1, 2, 1]
    wide = model_from_config(tiny_cfg(**{"model.blocks": "[1,2,1]", "model.channels": "[8,16,40]"}), 10)
    assert wide.fc.in_features == 20 and wide.edlab_spec["options"]["channels"] == [8, 16, 40]  # width 0.5
    save_checkpoint(wide, tmp_path / "wide.ckpt")
    assert load_checkpoint(tmp_path / "wide.ckpt").fc.in_features == 20  # rebuilt from the file alone
    assert "blocks" not in model_from_config(tiny_cfg(), 10).edlab_spec["options"]  # old specs unchanged


def test_separable_blocks_drop_the_inner_norm_and_keep_the_macs():
    """conv: separable is depthwise 3x3 -> pointwise 1x1 with no BN + ReLU between (Xception): the same convs
    and MACs as the depthwise student, less the inner BN's 2 parameters per channel."""
    from edlab.scoring import profile

    dw = create_model("resnet20", blocks=[2, 3, 3], conv="depthwise")
    sep = create_model("resnet20", blocks=[2, 3, 3], conv="separable")
    inner = sum(2 * b[0].in_channels for b in dw.modules() if isinstance(b, DepthwiseSeparable))
    assert all(len(b) == 2 for b in sep.modules() if isinstance(b, DepthwiseSeparable))
    assert n_params(sep) == n_params(dw) - inner
    assert profile(sep).macs == profile(dw).macs
    assert sep(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_strided_depthwise_conv_runs_in_fp32_under_cpu_bf16_autocast():
    """oneDNN's bf16 backward of a stride-2 depthwise conv is ~10x its fp32 one on CPUs, so that conv alone
    runs in fp32 under bf16 autocast: the block's output stays bf16 and equals the all-bf16 result up to
    bf16 rounding, gradients reach the conv, and without autocast nothing changes."""
    torch.manual_seed(0)
    block = DepthwiseSeparable(8, 16, stride=2)
    x = torch.randn(4, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
        ref = block[3](block[2](block[1](block[0](x))))  # the plain path: every conv in bf16
    assert y.dtype == torch.bfloat16 and y.shape == (4, 16, 8, 8)
    assert torch.allclose(y.float(), ref.float(), atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert block[0].weight.grad is not None and block[0].weight.grad.abs().sum() > 0
    block.eval()
    assert torch.equal(block(x), block[3](block[2](block[1](block[0](x)))))
