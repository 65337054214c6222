"""benchmarks/bench_qat_sensitivity.py: a float model's calibrated k-bit forms, read on its own validation split."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_qat_sensitivity.py"


def run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_each_probed_layer_gets_a_row_beside_the_uniform_forms(synthetic_ckpt, tmp_path):
    out = tmp_path / "sens.json"
    r = run(synthetic_ckpt, "--bits-w", "3", "--bits-a", "4", "--first", "2", "--json", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [row.get("form") for row in rows[:4]] == ["float", "all 3/4", "weights alone at 3",
                                                    "activations alone at 4 (weights at 8)"]
    layers = rows[4:]
    assert [row["layer"] for row in layers] == ["layers.0.0.conv1", "layers.0.0.conv2"]  # the stem is not probed
    assert all(0.0 <= v <= 1.0 for row in rows for k, v in row.items() if k not in ("form", "layer"))
    assert "layers.0.0.conv1" in r.stdout and "gain over all 3/4" in r.stdout


def test_a_checkpoint_without_a_validation_split_is_one_line(tmp_path):
    from edlab import create_model, save_checkpoint
    from edlab.config import load_train_config

    cfg = load_train_config(None, None, ["model.name=resnet20", "model.width=0.25", "data.dataset=synthetic",
                                         "data.val_size=0"])
    path = save_checkpoint(create_model("resnet20", width=0.25), tmp_path / "m.ckpt",
                           config=cfg.model_dump(mode="json"))
    r = run(path, cwd=tmp_path)
    assert r.returncode == 2 and "without a validation split" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
