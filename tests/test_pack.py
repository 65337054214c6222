"""edlab pack: a deployment file that holds what the score counts, reloads with the same outputs and score,
and is read by load_checkpoint, eval, score, bench and info."""

import json

import pytest
import torch
from click.testing import CliRunner

from edlab.checkpoint import save_checkpoint
from edlab.cli import cli
from edlab.loader import load_checkpoint
from edlab.models import create_model
from edlab.pack import pack_bits, pack_model, unpack_bits, unpack_model
from edlab.prune import prune_structured, prune_unstructured
from edlab.quantize import binarize, calibrate, quantize_qat, to_half
from edlab.scoring import profile

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet20", width=0.5)
    if kind.startswith("pruned"):
        prune_structured(m, 0.25, X[:1])
        prune_unstructured(m, 0.5)
    if "qat" in kind:
        b = int(kind.rsplit("qat", 1)[1])
        quantize_qat(m, b, b, first_last_bits=8 if b < 8 else None)
        calibrate(m, torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    if kind.startswith("bc"):
        binarize(m, scale=kind == "bc-scale")
    if kind == "fp16":
        m = to_half(m, torch.float16)
    with torch.no_grad():  # trained-looking BN statistics, so that folding them is tested
        for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def outputs(m):
    dtype = next(m.parameters()).dtype
    with torch.no_grad():
        return m(X.to(dtype)).float()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8])
def test_bit_fields_round_trip(bits):
    v = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(bits)).numpy()
    raw = pack_bits(v, bits)
    assert len(raw) == (1001 * bits + 7) // 8
    assert (unpack_bits(raw, bits, 1001) == v).all()


@pytest.mark.parametrize("kind", ["fp32", "qat2", "qat4", "qat8", "bc", "bc-scale", "pruned", "pruned+qat4", "fp16"])
def test_packed_model_has_the_same_outputs_score_and_the_size_the_score_counts(kind):
    m = make(kind)
    blob, sizes = pack_model(m)
    back = unpack_model(blob)
    # folding BN changes float rounding in the last bit: exact enough for float activations; a k-bit
    # activation sitting on a rounding boundary can move one level (0.6 % of a logit at most here)
    tol = 1e-2 if kind == "fp16" else 5e-2 if "qat" in kind else 1e-4
    ref = outputs(m)
    assert (outputs(back) - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
    assert (outputs(back).argmax(1) == outputs(m).argmax(1)).all()
    p, q = profile(m), profile(back)
    assert q.score == pytest.approx(p.score, rel=1e-9) and q.nonzero_params == p.nonzero_params
    assert (q.bits_w, q.bits_a, q.ps, q.pu) == pytest.approx((p.bits_w, p.bits_a, p.ps, p.pu))
    counted = p.score_params_term * 5.6e6 * 32 / 8
    body = sizes["file"] - sizes["header"] - sizes.get("mask", 0)
    assert body <= 1.10 * counted and sizes["header"] <= 4096, (sizes, counted)
    if kind.startswith("pruned"):  # the bitmask of the zeros: one bit per entry of the sparse tensors
        assert 0 < sizes["mask"] <= sum(t.numel() for t in m.parameters()) / 8 + 64


def test_a_qat_checkpoint_is_over_6x_its_packed_file(tmp_path):
    m = make("qat4")
    save_checkpoint(m, tmp_path / "m.ckpt")
    blob, _ = pack_model(m)
    assert (tmp_path / "m.ckpt").stat().st_size > 6 * len(blob)  # fp32 latents vs 4-bit codes


def test_pack_cli_and_every_reader(tmp_path):
    m = make("pruned+qat4")
    save_checkpoint(m, tmp_path / "m.ckpt", test_accuracy=0.5, inference={"tta": "flip", "views": 2,
                                                                             "precision": "fp32"})
    r = CliRunner().invoke(cli, ["pack", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "m.pack")])
    assert r.exit_code == 0, r.output
    assert "the score's parameter term counts" in r.output and "mask" in r.output
    back = load_checkpoint(tmp_path / "m.pack")
    assert torch.allclose(outputs(back), outputs(load_checkpoint(tmp_path / "m.ckpt")), atol=5e-2)
    assert back.edlab_metadata["test_accuracy"] == 0.5
    for path in ("m.ckpt", "m.pack"):  # the recorded views travel with the file
        r = CliRunner().invoke(cli, ["score", str(tmp_path / path), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["views"] == 2
    scores = [json.loads(CliRunner().invoke(cli, ["score", str(tmp_path / p), "--json"]).stdout)["score"]
              for p in ("m.ckpt", "m.pack")]
    assert scores[0] == pytest.approx(scores[1], rel=1e-9)
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "m.pack"), "--dataset", "synthetic", "--json"])
    assert r.exit_code == 0, r.output
    e = CliRunner().invoke(cli, ["eval", str(tmp_path / "m.ckpt"), "--dataset", "synthetic", "--json"])
    assert json.loads(r.stdout)["test_accuracy"] == pytest.approx(json.loads(e.stdout)["test_accuracy"], abs=0.004)
    r = CliRunner().invoke(cli, ["bench", str(tmp_path / "m.pack"), "--batch-sizes", "1", "--repeats", "1",
                                 "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "m.pack")])
    assert r.exit_code == 0, r.output


def test_corrupt_packed_file_is_one_line(tmp_path):
    m = make("qat4")
    blob, _ = pack_model(m)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x10
    (tmp_path / "bad.pack").write_bytes(bytes(bad))
    r = CliRunner().invoke(cli, ["score", str(tmp_path / "bad.pack")])
    assert r.exit_code == 2 and "corrupt" in r.output and "Traceback" not in r.output
    (tmp_path / "cut.pack").write_bytes(blob[:40])
    r = CliRunner().invoke(cli, ["score", str(tmp_path / "cut.pack")])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_pack_refuses_to_overwrite_its_source(tmp_path):
    save_checkpoint(make("fp32"), tmp_path / "m.ckpt")
    r = CliRunner().invoke(cli, ["pack", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "m.ckpt")])
    assert r.exit_code == 2 and "must not be the checkpoint itself" in r.output
    assert load_checkpoint(tmp_path / "m.ckpt") is not None


def test_info_on_a_packed_file_says_what_each_count_is(tmp_path):
    """`edlab info` on a packed QAT model read 69,210 parameters and "trained on 1,000 images" where its stages
    said 68,786 and 2,000: the first count adds the quantizer step sizes the score counts to the weights, the
    second is the last stage's train_subset. Both are now said as such, and every stage records its own."""
    import edlab

    opts = dict(threads=1, precision="fp32")
    s = edlab.train_run(model="resnet20", dataset="synthetic", epochs=1, train_subset=256, out=str(tmp_path / "t"),
                        sets=["model.width=0.25", "data.val_size=32", "final_test=false"], **opts)
    q = edlab.quantize_checkpoint(str(tmp_path / "t" / "model.ckpt"), "qat", bits_w=5, epochs=1, threads=1,
                                  train_subset=128, out=str(tmp_path / "q"), sets=["final_test=false"])
    edlab.pack_checkpoint(q["checkpoint"], tmp_path / "m.pack")
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "m.pack")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    steps = q["params"] - s["params"]
    assert steps > 0 and q["arch_params"] == s["params"]
    assert (f"{s['params']:,} weights and biases + {steps:,} quantizer step sizes/scales = {q['params']:,} "
            "parameters counted") in text
    assert "its last stage (quantize) trained on 128 images" in text
    assert "train_subset 256" in text and "train_subset 128" in text
