"""The tiny ConvNeXt family (models/convnext.py): counted like the rest of the zoo, prunable, quantizable."""

import dataclasses

import pytest
import torch

from edlab import EdlabError, create_model, load_checkpoint, save_checkpoint
from edlab.prune import order_split_outputs, prune_structured
from edlab.qlayers import LSQConv2d
from edlab.quantize import calibrate, quantize_qat
from edlab.scoring import RULES, profile

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def block_macs(dim: int, hidden: int, pixels: int, skip: bool = True) -> int:
    """A block by hand: three depthwise convs on a quarter of the channels each (3x3, 7x7, dilated 7x7),
    two 1x1 convs dim -> hidden (gate, value), one hidden -> dim, the per-channel skip scale."""
    q = dim // 4
    return pixels * (q * 9 + q * 49 + q * 49 + 2 * dim * hidden + hidden * dim + dim * skip)


def test_tiniest_matches_the_reference_size():
    # xvel/cifar10-tiniest: 97,530 parameters; 43.9 M MACs = its convs and linear, no skip-scale multiply
    m = create_model("convnext_tiniest")
    p = profile(m)
    assert p.params == sum(t.numel() for t in m.parameters()) == 97_530 and not p.notes
    stem, down, fc = 3 * 9 * 48 * 32 * 32, 80 * 3 * 16 * 16 * 16, 80 * 10
    assert p.macs == stem + 3 * block_macs(48, 48, 32 * 32) + down + 3 * block_macs(80, 80, 16 * 16) + fc
    assert p.macs == 44_087_072
    no_skip = profile(create_model("convnext_tiniest", skip_scale=False))
    assert (no_skip.params, no_skip.macs) == (97_530 - 3 * 48 - 3 * 80, 43_878_176)


@pytest.mark.parametrize("name", ["convnext_tiniest", "convnext_nano"])
def test_counted_params_are_all_parameters(name):
    m = create_model(name, width=0.5, blocks=[1, 2])
    p = profile(m)
    assert p.params == p.arch_params == sum(t.numel() for t in m.parameters())
    assert not p.notes  # no parameter left out, no op uncounted (LayerNorm, exp, clamp included)
    assert m(X).shape == (4, 10)


def test_block_macs_and_the_gate_charged_as_elementwise():
    m = create_model("convnext_nano")
    rows = {r.name: r for r in profile(m).rows}
    assert sum(r.macs for n, r in rows.items() if n.startswith("stages.0.2.")) == block_macs(32, 32, 16 * 16)
    assert "stages.0.2" not in rows  # the block's own ops (split, cat, gate product, residual add) cost no f
    micro = {r.name: r for r in profile(m, rules="micronet").rows}
    # micronet counts elementwise ops: one mult per gate element, one add per residual element
    assert micro["stages.0.2"].ops == 32 * 16 * 16 + 32 * 16 * 16
    # TanhExp = clamp + exp + tanh (activations) + mul (elementwise): 4 ops per element
    assert micro["stages.0.2.act"].ops == 4 * 32 * 16 * 16
    course_with_ops = dataclasses.replace(RULES["course"], ops=frozenset({"eltwise"}))
    assert {r.name: r for r in profile(m, rules=course_with_ops).rows}["stages.0.2"].ops == 2 * 32 * 16 * 16


def test_width_blocks_and_bad_options():
    m = create_model("convnext_nano", width=0.5, blocks=[1, 1])
    assert [m.stages[0][0].out_channels, m.stages[1][0].out_channels] == [16, 32]
    assert len(m.stages[0]) == 3  # stem, norm, one block
    assert m.stages[1][0].groups == 8  # 16 groups would leave one input channel a group (Torch-Pruning fails)
    assert create_model("convnext_tiniest").stages[1][0].groups == 16  # the reference's 48 -> 80
    assert create_model("convnext_tiniest", width=0.3).stages[0][0].out_channels == 16  # 14.4 -> multiple of 4
    with pytest.raises(EdlabError, match="only conv=standard"):
        create_model("convnext_nano", conv="depthwise")
    with pytest.raises(EdlabError, match="blocks"):
        create_model("convnext_nano", blocks=[1, 2, 3])


def test_torch_pruning_removes_each_part_from_its_own_layers():
    import torch_pruning as tp

    m = create_model("convnext_tiniest").eval()
    with torch.no_grad():  # tag every depthwise channel with its index
        for block in list(m.stages[0])[2:]:
            for conv in (block.mix3, block.mix7, block.mix7d):
                conv.weight.copy_(torch.arange(12.0).view(12, 1, 1, 1).expand_as(conv.weight))
    graph = tp.DependencyGraph().build_dependency(m, example_inputs=X[:1])
    assert order_split_outputs(graph) > 0  # Torch-Pruning met the parts out of order
    # residual channels: [0, 12) untouched | [12, 24) 3x3 | [24, 36) 7x7 | [36, 48) dilated 7x7
    graph.get_pruning_group(m.stages[0][0], tp.prune_conv_out_channels, idxs=[5, 13, 30, 47]).prune()
    for block in list(m.stages[0])[2:]:
        gone = [[i for i in range(12) if i not in c.weight[:, 0, 0, 0].tolist()]
                for c in (block.mix3, block.mix7, block.mix7d)]
        assert gone == [[1], [6], [11]]


@pytest.mark.filterwarnings("ignore:structured pruning")  # whole channels: 0.331 removed for 0.3 asked
def test_train_prune_qat_and_checkpoint(tiny_cfg, tmp_path, one_thread):
    from edlab.data import data_from_config
    from edlab.train import fit, model_from_config

    cfg = tiny_cfg(**{"model.name": "convnext_nano", "model.width": 1.0, "data.train_subset": 128, "epochs": 1})
    data = data_from_config(cfg, torch.device("cpu"))
    model = model_from_config(cfg, data.num_classes)
    before = model.stages[1][2].fc_gate.weight.detach().clone()
    state = fit(model, data, cfg, run=None)
    assert state.history and not torch.equal(before, model.stages[1][2].fc_gate.weight)

    dense = profile(model)
    prune_structured(model, 0.3)
    pruned = profile(model)
    assert pruned.params < dense.params and pruned.macs < dense.macs and pruned.score < dense.score
    assert pruned.ps == pytest.approx(0.3, abs=0.05) and pruned.params == sum(t.numel() for t in model.parameters())
    assert model(X).shape == (4, 10)

    quantize_qat(model, 4, 4)
    calibrate(model, X)
    assert model.stages[1][2].fc_gate.weight_bits == 4 and isinstance(model.stages[1][2].skip, LSQConv2d)
    q = profile(model)
    assert q.score < pruned.score and q.bits_w < 32 and torch.isfinite(model(X)).all()

    path = save_checkpoint(model.eval(), tmp_path / "cx.ckpt")
    back = load_checkpoint(path)
    assert torch.equal(back(X), model(X))
    assert profile(back).score == pytest.approx(q.score)
    assert back.stages[0][1].normalized_shape == model.stages[0][1].normalized_shape
