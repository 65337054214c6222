"""Pruning: structured removal really shrinks every zoo model (couplings handled), unstructured sparsity is
exact and held through fine-tuning, the score reads both, checkpoints reload, the CLI recipe runs end to end."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from edlab import EdlabError, create_model, load_checkpoint, save_checkpoint
from edlab.prune import fold_masks, has_masks, hold_masks, prune_structured, prune_unstructured, schedule, sparsity_of
from edlab.scoring import profile

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

# tiny models are coarse: "closest that whole channels allow" warnings are expected here
pytestmark = pytest.mark.filterwarnings("ignore:structured pruning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def tiny(conv="standard", width=0.5):
    torch.manual_seed(0)
    return create_model("resnet20", width=width, conv=conv).eval()


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_schedules():
    assert schedule(0.5, 4, "linear") == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert schedule(0.5, 4, "cubic") == pytest.approx([0.2890625, 0.4375, 0.4921875, 0.5])
    assert schedule(0.6, 2, "linear", initial=0.2) == pytest.approx([0.4, 0.6])
    assert schedule(0.3, 1, "cubic") == [0.3]
    with pytest.raises(EdlabError, match="unknown schedule"):
        schedule(0.5, 2, "exp")


@pytest.mark.parametrize("name,conv,target,global_pruning", [
    ("resnet20", "standard", "params", False), ("resnet20", "depthwise", "params", False),
    ("resnet20", "grouped:2", "params", False), ("resnet20", "standard", "macs", True),
    ("resnet20", "depthwise", "macs", True), ("preact_resnet18", "grouped:4", "params", True),
    ("resnet50", "depthwise", "params", False),
])
def test_structured_removes_the_requested_fraction(name, conv, target, global_pruning):
    torch.manual_seed(0)
    m = create_model(name, width=0.5 if name == "resnet20" else 0.25, conv=conv).eval()
    dense_params = n_params(m)
    before = profile(m)
    prune_structured(m, 0.4, target=target, global_pruning=global_pruning)
    after = profile(m)
    removed = after.ps if target == "params" else 1 - after.macs / before.macs
    assert removed == pytest.approx(0.4, abs=0.06 if conv.startswith("grouped") else 0.03)
    assert n_params(m) < 0.75 * dense_params  # physically smaller, not masked
    assert m(X).shape == (2, 10) and m.fc.out_features == 10
    assert after.ps > 0.2 and after.pu < 1e-4
    assert after.score_ops_term < 0.8 * before.score_ops_term and after.score < before.score


@pytest.mark.parametrize("conv", ["standard", "depthwise", "grouped:2"])
def test_dead_channels_are_removed_without_changing_the_output(conv):
    """Every BN zeroes channels c % 4 == 0 (γ = β = 0), consistently along each residual stream, so those
    channels carry nothing. Removing them with BN-scale importance must leave the outputs unchanged: this
    fails if a coupling (residual sum, shortcut, depthwise in=out, grouped conv groups) is cut wrong."""
    m = tiny(conv)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.running_var.uniform_(0.5, 2)
                bn.weight[::4] = 0
                bn.bias[::4] = 0
    ref = m(X)
    probe = copy.deepcopy(m)
    from edlab.prune import prune_channels

    prune_channels(probe, 0.25, X[:1], "bn", False, ["fc"], None)  # a quarter of every group's channels
    prune_structured(m, 1 - profile(probe).arch_params / profile(m).arch_params, importance="bn")
    assert n_params(m) == n_params(probe) < n_params(tiny(conv))
    assert torch.allclose(m(X), ref, atol=1e-5)


def test_structured_torchvision_resnet18_and_round_trip(tmp_path):
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    before = profile(m)
    prune_structured(m, 0.3, ignore=["conv1"])  # keep the stem's outputs (and the residual stream after it)
    after = profile(m)
    assert after.ps == pytest.approx(0.3, abs=0.02) and after.score_ops_term < before.score_ops_term
    assert m.conv1.out_channels == 64 and m.fc.out_features == 10
    p = save_checkpoint(m, tmp_path / "tv.ckpt", arch={"builder": "torchvision.models.resnet18",
                                                        "kwargs": {"num_classes": 10}})
    r = load_checkpoint(p)
    assert torch.allclose(r(X), m(X), atol=1e-5) and profile(r).ps == pytest.approx(after.ps)


def test_pruned_checkpoints_reload_in_a_fresh_process(tmp_path):
    saved = {}
    for conv in ["depthwise", "grouped:2"]:
        m = tiny(conv)
        prune_structured(m, 0.3)
        prune_unstructured(m, 0.2)
        fold_masks(m)
        path = tmp_path / f"{conv.replace(':', '')}.ckpt"
        save_checkpoint(m, path)
        saved[str(path)] = (m(X).sum().item(), profile(m).score, profile(m).ps, profile(m).pu)
    torch.save(X, tmp_path / "x.pt")
    code = ("import json, sys, torch; from edlab import load_checkpoint; from edlab.scoring import profile\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    m = load_checkpoint(p); pr = profile(m)\n"
            "    out[p] = [m(x).sum().item(), pr.score, pr.ps, pr.pu]\n"
            "print(json.dumps(out))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *saved], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    for path, values in json.loads(r.stdout).items():
        assert values == pytest.approx(list(saved[path]), rel=1e-5, abs=1e-5)
        assert values[2] == pytest.approx(0.3, abs=0.06) and values[3] == pytest.approx(0.2, abs=1e-4)


def test_unstructured_global_sparsity_is_exact_and_only_the_params_term_drops():
    m = tiny()
    before = profile(m)
    prune_unstructured(m, 0.3)
    after = profile(m)
    dense = m.edlab_dense_reference["params"]
    assert after.pu * dense == round(0.3 * dense)  # exact count of zeros
    assert after.ps == 0 and after.arch_params == before.arch_params
    assert after.score_params_term == pytest.approx(before.score_params_term * (1 - after.pu), rel=1e-6)
    assert after.score_ops_term == pytest.approx(before.score_ops_term)


def test_unstructured_per_layer_gives_every_layer_the_same_sparsity():
    m = tiny()
    prune_unstructured(m, 0.5, scope="layer", relative_to="weights")
    fractions = [float((mod.weight == 0).float().mean()) for mod in m.modules()
                 if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert min(fractions) == pytest.approx(0.5, abs=0.02) and max(fractions) == pytest.approx(0.5, abs=0.02)


def test_structured_then_unstructured_matches_the_score(tmp_path):
    m = tiny()
    prune_structured(m, 0.3)
    prune_unstructured(m, 0.2)
    prune_unstructured(m, 0.25)  # a second call goes further from the same dense reference
    p = profile(m)
    assert p.ps == pytest.approx(0.3, abs=0.03) and p.pu == pytest.approx(0.25, abs=1e-4)
    assert p.formula_view["params_term"] == pytest.approx(p.score_params_term)
    with pytest.raises(EdlabError, match="not reachable"):
        prune_unstructured(m, 0.69)


def test_masks_hold_during_fit_and_fold_at_the_end(tiny_cfg):
    from edlab.data import data_from_config
    from edlab.train import fit

    cfg = tiny_cfg(epochs=1, **{"data.train_subset": 256})
    m = tiny()
    prune_unstructured(m, 0.5)
    zero = {n: mod.weight.detach() == 0 for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    start = copy.deepcopy(m.state_dict())
    fit(m, data_from_config(cfg, torch.device("cpu")), cfg)
    for n, mod in m.named_modules():
        if n in zero:
            assert (mod.weight[zero[n]] == 0).all(), n
    assert not torch.equal(start["layers.0.0.conv1.weight"], m.state_dict()["layers.0.0.conv1.weight"])
    assert has_masks(m) and fold_masks(m) > 0 and not has_masks(m)
    keys = list(m.state_dict())
    assert not any("orig" in k or "mask" in k for k in keys)
    assert sparsity_of(m) == pytest.approx(0.5, abs=1e-4)


def test_fold_masks_also_folds_torch_prune_and_structured_keeps_held_masks():
    from torch.nn.utils import prune as torch_prune

    m = tiny()
    torch_prune.l1_unstructured(m.conv1, "weight", amount=0.5)
    assert fold_masks(m) == 1 and "conv1.weight_orig" not in m.state_dict()
    prune_unstructured(m, 0.2)
    prune_structured(m, 0.3)  # masks are re-derived on the smaller layers
    assert has_masks(m) and m(X).shape == (2, 10)
    hold_masks(m)
    assert has_masks(m)


def test_taylor_needs_batches_and_runs_with_them():
    m = tiny()
    with pytest.raises(EdlabError, match="calibration"):
        prune_structured(m, 0.3, importance="taylor")
    y = torch.tensor([1, 2])
    prune_structured(m, 0.3, importance="taylor", batches=[(X, y)], global_pruning=True)
    assert profile(m).ps == pytest.approx(0.3, abs=0.03)
    assert all(p.grad is None for p in m.parameters())


def test_iterative_steps_call_back_with_cumulative_targets():
    m = tiny(width=0.25)
    seen = []
    prune_structured(m, 0.4, steps=2, callback=lambda _m, info: seen.append(info))
    prune_unstructured(m, 0.3, steps=3, schedule_kind="cubic", callback=lambda _m, info: seen.append(info))
    assert [i["kind"] for i in seen] == ["structured"] * 2 + ["unstructured"] * 3
    assert [i["target"] for i in seen] == pytest.approx([0.2, 0.4, 0.3 * (1 - (2 / 3) ** 3), 0.3 * (1 - (1 / 3) ** 3),
                                                         0.3])
    assert seen[0]["achieved"] < seen[1]["achieved"] and seen[-1]["achieved"] == pytest.approx(0.3, abs=1e-3)


def test_from_scratch_keeps_widths_and_zeros(tiny_cfg, tmp_path):
    from edlab.data import data_from_config
    from edlab.prune import Recipe, reinitialize, run_recipe
    from edlab.runs import Run

    m = prune_structured(tiny(width=0.25), 0.3)
    shapes = {k: v.shape for k, v in m.state_dict().items()}
    before = m.layers[0][0].conv1.weight.clone()
    reinitialize(m, seed=1)
    assert {k: v.shape for k, v in m.state_dict().items()} == shapes
    assert not torch.equal(before, m.layers[0][0].conv1.weight)

    cfg = tiny_cfg(epochs=1, **{"data.train_subset": 128, "data.val_size": 64})
    recipe = Recipe(structured=0.3, unstructured=0.2, from_scratch=True, scratch_epochs=1)
    run = Run.create("t", str(tmp_path / "scratch"))
    model, s = run_recipe(tiny(width=0.25), recipe, cfg, data_from_config(cfg, torch.device("cpu")), run)
    rows = run.metrics()
    assert [r["kind"] for r in rows] == ["dense", "structured", "unstructured", "scratch"]
    assert [r["finetune_epochs"] for r in rows] == [0, 0, 0, 1]
    assert s["pu"] == pytest.approx(0.2, abs=1e-3)  # the zeros survived re-init and training
    assert s["ps"] == pytest.approx(0.3, abs=0.06) and "test_accuracy" in s
    assert not has_masks(model) and (tmp_path / "scratch" / "model.ckpt").exists()


def test_cli_prune_end_to_end(tmp_path, synthetic_ckpt):
    from edlab.cli import cli

    ckpt = synthetic_ckpt
    out = tmp_path / "run"
    args = ["prune", ckpt, "--structured", "0.3", "--unstructured", "0.2", "--finetune-epochs", "1",
            "--train-subset", "128", "--out", out, "--distill"]
    r = CliRunner().invoke(cli, [str(a) for a in args])  # in process: test_cli.py drives the real command line
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["dense", "structured", "unstructured"]
    for row in rows:
        assert {"step", "target", "ps", "pu", "params", "macs", "score", "val_accuracy"} <= set(row)
    assert rows[1]["ps"] == pytest.approx(0.3, abs=0.06) and rows[2]["pu"] == pytest.approx(0.2, abs=1e-3)
    assert (out / "finetune.jsonl").read_text().count("\n") == 2
    s = json.loads((out / "summary.json").read_text())
    for key in ("score", "score_params_term", "score_ops_term", "ps", "pu", "params", "macs", "test_accuracy",
                "val_accuracy", "command"):
        assert key in s, key
    m = load_checkpoint(out / "model.ckpt")
    assert not any("orig" in k or "mask" in k for k in m.state_dict())
    assert profile(m).score == pytest.approx(s["score"]) and profile(m).pu == pytest.approx(s["pu"])
    assert m.edlab_metadata["prune"]["structured"] == 0.3  # (a fresh-process reload: the test above)


@pytest.mark.parametrize("args,msg", [
    (["--structured", "1.0"], "--structured must be a fraction in [0, 1)"),
    (["--structured", "0.6", "--unstructured", "0.5"], "must be < 1"),
    (["--structured", "0.3", "--importance", "magic"], "unknown importance 'magic'"),
    (["--structured", "0.3", "--schedule", "exp"], "unknown schedule 'exp'"),
    (["--structured", "0.3", "--target", "flops"], "unknown target 'flops'"),
    ([], "nothing to prune"),
    (["--structured", "0.3", "--keep", "fc,stem"], "layer 'stem' to keep is not in the model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, msg, tmp_path):
    from edlab.cli import cli

    r = CliRunner().invoke(cli, ["prune", "resnet20", *args, "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_malformed_dense_reference_is_one_line(synthetic_ckpt, runs_unchanged):
    """A dense reference (the unpruned counts ps and pu are fractions of) without counts: KeyError 'params'
    after the run folder was made, before."""
    from conftest import assert_one_line_error, invoke, rewrite_header

    bad = rewrite_header(synthetic_ckpt, synthetic_ckpt.with_name("bad.ckpt"),
                          lambda h: {**h, "dense_reference": {"builder": "not-a-zoo-model"}})
    assert_one_line_error(invoke("prune", bad, "--structured", "0.3"), "dense reference must be {'params'")
    runs_unchanged()
    m = create_model("resnet20", width=0.25)
    m.edlab_dense_reference = {"builder": "not-a-zoo-model"}  # set in code: the same line
    with pytest.raises(EdlabError, match="dense reference must be"):
        sparsity_of(m)


def test_an_onnx_file_is_refused_before_a_run_folder_is_made(synthetic_ckpt, runs_unchanged):
    """Before: ZeroDivisionError in sparsity_of, and an empty run folder per attempt."""
    pytest.importorskip("onnxruntime")
    from conftest import assert_one_line_error, invoke

    onnx = synthetic_ckpt.with_name("m.onnx")
    assert invoke("export", synthetic_ckpt, "--out", onnx).exit_code == 0
    assert_one_line_error(invoke("prune", onnx, "--structured", "0.3"), "ONNX models are exported, not pruned")
    runs_unchanged()


def test_a_quantized_checkpoint_is_refused_before_a_run_folder_is_made(synthetic_ckpt, runs_unchanged):
    """A QAT model (as `edlab quantize --method qat` saves it): Torch-Pruning used to fail on its layers after
    the run folder was made and runs/latest moved to it."""
    from conftest import assert_one_line_error, invoke

    from edlab.quantize import calibrate, quantize_qat

    src = load_checkpoint(synthetic_ckpt)
    qat = quantize_qat(src, 4, 4)
    calibrate(qat, torch.randn(8, 3, 32, 32))
    path = save_checkpoint(qat, synthetic_ckpt.with_name("qat.ckpt"), **src.edlab_metadata)
    assert_one_line_error(invoke("prune", path, "--structured", "0.3"), "models are pruned before quantization")
    runs_unchanged()
