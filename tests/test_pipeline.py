import json
from pathlib import Path

import pytest

from edlab import EdlabError
from edlab.pipeline import load_recipe, run_pipeline, stage_argv

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quick-synthetic.yaml"


def test_stage_argv_maps_options_to_the_cli(tmp_path):
    argv = stage_argv("prune", {"structured": 0.3, "distill": True, "global": False, "set": ["a=1", "b=2"],
                                "optim.lr": 0.01}, "m.ckpt", tmp_path)
    assert argv == ["prune", "m.ckpt", "--structured", "0.3", "--distill", "--set", "a=1", "--set", "b=2",
                    "--set", "optim.lr=0.01", "--out", str(tmp_path)]
    assert stage_argv("score", {}, "m.ckpt", tmp_path) == ["score", "m.ckpt", "--json"]
    with pytest.raises(EdlabError, match="needs a checkpoint"):
        stage_argv("score", {}, None, tmp_path)


def test_overrides_edit_stages():
    r = load_recipe(str(RECIPE), ["train.epochs=3", "1.rules=micronet", "train.optim.lr=0.2"])
    assert r["stages"][0][1]["epochs"] == 3 and r["stages"][0][1]["optim.lr"] == 0.2
    assert r["stages"][1][1]["rules"] == "micronet"
    with pytest.raises(EdlabError, match="name a stage"):
        load_recipe(str(RECIPE), ["export.int8=true"])


@pytest.mark.parametrize("text,msg", [
    ("stages: []\n", "non-empty list"),
    ("stages:\n  - train: {}\n    score: {}\n", "one key"),
    ("name: x\nstagez: []\n", "unknown key"),
])
def test_bad_recipes(tmp_path, text, msg):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(EdlabError, match=msg):
        load_recipe(str(p))


@pytest.mark.parametrize("stage, msg", [("sweep", "stage 'sweep' needs study-file"),
                                        ("report", "stage 'report' needs paths")])
def test_a_stage_without_its_required_argument_is_one_line(tmp_path, stage, msg):
    p = tmp_path / "r.yaml"
    p.write_text(f"stages:\n  - {stage}: {{}}\n")
    with pytest.raises(EdlabError, match=msg):
        run_pipeline(str(p), out=str(tmp_path / "out"))


def test_pipeline_runs_and_continues(tmp_path):
    out = tmp_path / "pipe"
    r = run_pipeline(str(RECIPE), out=str(out), echo=lambda *a: None)
    assert [s["name"] for s in r["stages"]] == ["train", "prune", "quantize", "score", "eval"]
    train, prune, quant = (s["summary"] for s in r["stages"][:3])
    assert prune["params"] < train["params"] and prune["pu"] == pytest.approx(0.2, abs=0.01)
    assert (quant["bits_w"], quant["bits_a"]) == (16, 16)
    score = json.loads((out / "03-score" / "result.json").read_text())
    assert r["checkpoint"].endswith("02-quantize/model.ckpt")
    assert score["score"] == pytest.approx(quant["score"]) and score["score"] < prune["score"] < train["score"]
    ev = json.loads((out / "04-eval" / "result.json").read_text())
    assert 0 <= ev["test_accuracy"] <= 1
    seen = []
    again = run_pipeline(str(RECIPE), out=str(out), echo=seen.append)
    assert all("skipped" in line for line in seen[:5]) and again["checkpoint"] == r["checkpoint"]


def test_score_after_int8_takes_the_int8_stage_figures(tmp_path):
    """int8 leaves an .onnx file, no checkpoint: the score stage reports what the int8 stage measured."""
    pytest.importorskip("onnxruntime")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text().split("  - prune:")[0]
                      + "  - quantize: {method: int8, calib-images: 64}\n  - score: {}\n")
    r = run_pipeline(str(recipe), out=str(tmp_path / "p"), echo=lambda *a: None)
    quant, score = r["stages"][1]["summary"], json.loads((tmp_path / "p" / "02-score" / "result.json").read_text())
    assert quant["bits_w"] > 8 - 1e-9 and score["scored_by"] == "quantize"
    assert score["score"] == pytest.approx(quant["score"])
    assert score["score"] < r["stages"][0]["summary"]["score"]


def test_a_recipe_run_from_another_folder_finds_the_paths_it_names(tmp_path, monkeypatch):
    """The repo's frontier recipe names configs/student-dw233-distill.yaml from the repo root; a recipe of
    one's own names cfg.yaml beside itself. Both are found from any working directory; --set paths stay the
    working directory's."""
    from edlab.pipeline import check_stages

    monkeypatch.chdir(tmp_path)
    frontier = load_recipe(str(RECIPE.with_name("frontier-student.yaml")))
    check_stages(frontier)  # before: "config file not found: configs/student-dw233-distill.yaml"
    assert Path(frontier["stages"][0][1]["config"]).is_file()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "cfg.yaml").write_text("epochs: 1\n")
    (tmp_path / "r" / "recipe.yaml").write_text(
        "stages:\n  - train: {config: cfg.yaml, set: [distill.teacher=t.ckpt, epochs=2]}\n"
        "  - score: {checkpoint: m.ckpt}\n")
    (tmp_path / "r" / "t.ckpt").write_bytes(b"")
    (tmp_path / "m.ckpt").write_bytes(b"")  # beside the working directory only: found there
    r = load_recipe(str(tmp_path / "r" / "recipe.yaml"), ["train.model.checkpoint=x.ckpt"])
    train, score = r["stages"][0][1], r["stages"][1][1]
    assert Path(train["config"]) == tmp_path / "r" / "cfg.yaml"
    assert train["set"] == [f"distill.teacher={tmp_path / 'r' / 't.ckpt'}", "epochs=2"]
    assert train["model.checkpoint"] == "x.ckpt" and score["checkpoint"] == "m.ckpt"
