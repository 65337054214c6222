"""ONNX export: fp32 graphs match PyTorch (float, binary and k-bit models), int8 graphs run under ONNX Runtime
with integer kernels and agree with fp32, the `edlab export` command and the int8 stage."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edlab.checkpoint import load_checkpoint
from edlab.cli import cli
from edlab.data import get_data
from edlab.models import create_model
from edlab.quantize import binarize, calibrate, quantize_checkpoint, quantize_qat

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edlab.export import export_onnx, ort_evaluate, ort_session, plain_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("threads_from_env")  # (conftest)

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def run(path, x: torch.Tensor) -> np.ndarray:
    return ort_session(path, threads=1).run(None, {"input": x.numpy()})[0]


def test_a_pruned_int8_model_reads_the_same_in_quantize_and_in_score(tiny_ckpt, tmp_path):
    """One model, one reading: `edlab quantize --method int8` and `edlab score` on the .onnx it wrote print the
    same ps, pu and score. The graph of a structurally pruned model is physically smaller, so ps comes from
    the dense reference and source ps the file records (it read ps 0 / pu 0.40 against quantize's 0.50 / 0.20,
    and another score: quantize counted a torch copy with BN unfolded)."""
    from edlab.prune import prune_checkpoint

    p = prune_checkpoint(str(tiny_ckpt), structured=0.5, unstructured=0.2, finetune_epochs=0,
                         out=str(tmp_path / "prune"), threads=1, train_subset=64)
    q = quantize_checkpoint(str(tmp_path / "prune" / "model.ckpt"), "int8", calib_images=64,
                            out=str(tmp_path / "int8"), sets=["final_test=false"])
    r = CliRunner().invoke(cli, ["score", q["checkpoint"], "--json"])
    assert r.exit_code == 0, r.output
    read = json.loads(r.stdout)
    assert q["ps"] == pytest.approx(p["ps"]) and q["pu"] == pytest.approx(p["pu"]) and q["ps"] > 0.3
    for key in ("ps", "pu", "score", "params", "macs", "bits_w", "bits_a"):
        assert read[key] == pytest.approx(q[key]), key
    r = CliRunner().invoke(cli, ["score", q["checkpoint"]])
    assert f"score = {q['score']:.4f}" in r.output and f"ps = {q['ps']:.4f}, pu = {q['pu']:.4f}" in r.output


@pytest.mark.parametrize("kind", ["float", "binary", "qat"])
def test_fp32_export_matches_pytorch(tmp_path, kind):
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.5)
    if kind == "binary":
        binarize(model, scale=True)
    elif kind == "qat":
        quantize_qat(model, 4, 4)
        calibrate(model, X)
    model.eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    assert "BatchNormalization" not in ops(path)  # folded into the convs
    with torch.no_grad():
        ref = model(X).numpy()
    out = run(path, X)
    assert out.shape == ref.shape
    if kind == "qat":  # same fake-quant arithmetic; a value on a rounding boundary may land one step apart
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.75 and np.abs(out - ref).mean() < 1e-2
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    assert run(path, X[:3]).shape == (3, 10)  # dynamic batch size


def test_convnext_exports_and_scores_like_the_checkpoint(tmp_path):
    from edlab.onnx_model import onnx_profile
    from edlab.scoring import profile

    model = create_model("convnext_nano", width=0.5).eval()
    with torch.no_grad():  # as after training: fresh norms and skip scales (all ones) would be one shared tensor
        for t in model.parameters():
            t.add_(0.01 * torch.randn_like(t))
    path = export_onnx(model, tmp_path / "cx.onnx")
    assert "LayerNormalization" in ops(path)
    with torch.no_grad():
        np.testing.assert_allclose(run(path, X), model(X).numpy(), rtol=1e-3, atol=1e-4)
    p, q = onnx_profile(path), profile(model)
    assert (p.params, p.macs) == (q.params, q.macs)  # the LayerNorms' scales and shifts counted in both


def test_uncalibrated_qat_model_is_refused(tmp_path):
    from edlab.errors import EdlabError

    with pytest.raises(EdlabError, match="uncalibrated"):
        export_onnx(quantize_qat(create_model("resnet20", width=0.25), 8, 8), tmp_path / "m.onnx")


def test_int8_export_runs_integer_kernels_and_agrees_with_fp32(tiny_ckpt, tmp_path):
    model = load_checkpoint(tiny_ckpt)
    data = get_data("synthetic", val_size=0, eval_batch_size=250)
    path = export_onnx(model, tmp_path / "m.int8.onnx", int8=True, calib_loader=plain_batches(data, 256),
                       calib_images=256)
    assert {"QLinearConv", "QLinearAdd"} <= ops(path) and "Conv" not in ops(path)
    x = next(iter(data.test))[0]
    with torch.no_grad():
        ref = model(x).argmax(1).numpy()
    assert (run(path, x).argmax(1) == ref).mean() >= 0.9
    fp32 = ort_evaluate(ort_session(export_onnx(model, tmp_path / "m.onnx")), data.test)["accuracy"]
    int8 = ort_evaluate(ort_session(path), data.test)["accuracy"]
    assert abs(int8 - fp32) <= 0.05


def test_int8_stage_writes_onnx_summary_and_latency(int8_stage):
    out, s = int8_stage  # quantize_checkpoint(tiny_ckpt, "int8", calib_images=128): conftest
    saved = json.loads((out / "summary.json").read_text())
    assert saved["checkpoint"].endswith("model.int8.onnx") and (out / "model.int8.onnx").exists()
    assert s["bits_a"] == 8 and s["bits_w"] == 8  # the int8 file's count: int8 weights (int32 biases, BN folded
    # into them, count at 32 bits in the params term)
    lat = s["latency"]
    assert lat["batch"] == 64 and lat["ort_int8_ms"] > 0 and lat["speedup_vs_torch_fp32"] > 0
    assert abs(s["accuracy_change"]) <= 0.05


def test_onnx_files_are_first_class_for_eval_score_bench_and_info(tiny_ckpt, tmp_path):
    """`edlab export` writes them (to a file, or into a folder as a pipeline gives it) and refuses an unknown
    format. The .onnx files edlab writes carry their dataset and normalisation: eval, score, bench and info read
    them."""
    from edlab.onnx_model import onnx_metadata, onnx_profile
    from edlab.scoring import profile

    fp32, int8 = tmp_path / "stage" / "model.onnx", tmp_path / "m.int8.onnx"
    r = CliRunner().invoke(cli, ["export", str(tiny_ckpt), "--no-eval", "--out", str(tmp_path / "stage")])
    assert r.exit_code == 0 and fp32.exists()  # --out as a folder (pipelines)
    r = CliRunner().invoke(cli, ["export", str(tiny_ckpt), "--int8", "--calib-images", "128", "--out", str(int8)])
    assert r.exit_code == 0, r.output
    assert int8.exists() and "ONNX Runtime test accuracy" in r.output
    r = CliRunner().invoke(cli, ["export", str(tiny_ckpt), "--format", "tflite"])
    assert r.exit_code == 2 and r.stderr.strip() == "edlab: error: unknown export format 'tflite' (choices: onnx)"
    meta = onnx_metadata(int8)
    assert meta["dataset"] == "synthetic" and len(meta["mean"]) == 3 and meta["inference"]["views"] == 1
    accs = {}
    for path in (tiny_ckpt, fp32, int8):
        r = CliRunner().invoke(cli, ["eval", str(path), "--json", "--tta", "none"])
        assert r.exit_code == 0, r.output
        accs[path.name] = json.loads(r.stdout)["test_accuracy"]
    assert accs[fp32.name] == pytest.approx(accs[tiny_ckpt.name], abs=0.004)  # the same function, exported
    assert accs[int8.name] == pytest.approx(accs[tiny_ckpt.name], abs=0.05)
    # the score counted from the graphs: the fp32 export has the checkpoint's MACs, the int8 one 8-bit everything
    ref = profile(load_checkpoint(tiny_ckpt), views=1)
    p32, p8 = onnx_profile(fp32), onnx_profile(int8)
    assert p32.macs == ref.macs == p8.macs
    assert (p32.bits_w, p32.bits_a) == (32, 32) and p8.bits_a == 8 and 8 <= p8.bits_w < 9  # int32 biases
    assert p8.score_ops_term == pytest.approx(ref.score_ops_term / 4)
    assert p32.score_params_term < ref.score_params_term  # BN folded: one bias vector instead of scale + shift
    r = CliRunner().invoke(cli, ["score", str(int8), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["score"] == pytest.approx(p8.score)
    r = CliRunner().invoke(cli, ["score", str(int8), "--json", "--tta", "flip"])
    assert json.loads(r.stdout)["score_ops_term"] == pytest.approx(2 * p8.score_ops_term)
    r = CliRunner().invoke(cli, ["bench", str(int8), "--batch-sizes", "1", "--repeats", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["info", str(int8)])
    assert r.exit_code == 0 and "ONNX file" in r.output, r.output
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    r = CliRunner().invoke(cli, ["score", str(tmp_path / "bad.onnx")])
    assert r.exit_code == 2 and "not a valid ONNX file" in r.output
