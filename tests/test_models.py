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
