import fcntl
import json
from pathlib import Path

import pytest
from conftest import TINY_TRAIN as TINY  # (the same tiny run and runner)
from conftest import assert_one_line_error as one_line
from conftest import invoke

from edlab import EdlabError, save_checkpoint
from edlab.models import create_model
from edlab.pipeline import load_recipe, run_pipeline, stage_argv

ROOT = Path(__file__).resolve().parents[1]
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


def test_a_stage_flag_and_a_config_key_under_its_name_are_set_together(tmp_path):
    """quantize's --distill flag and the config's distill.* section share a name; nesting the pairs into
    one tree made them collide ('distill' is not a section)."""
    p = tmp_path / "recipe.yaml"
    p.write_text("stages:\n  - quantize: {checkpoint: m.ckpt, method: qat, distill: true}\n")
    r = load_recipe(str(p), ["quantize.distill=false", "quantize.distill.crop_pool=4", "0={epochs: 2}"])
    opts = r["stages"][0][1]
    assert opts["distill"] is False and opts["distill.crop_pool"] == 4 and opts["epochs"] == 2
    argv = stage_argv("quantize", opts, None, tmp_path)
    assert "--distill" not in argv and argv[argv.index("distill.crop_pool=4") - 1] == "--set"


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


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """An untrained resnet20 checkpoint (no training needed for scoring and pipeline bookkeeping)."""
    p = tmp_path_factory.mktemp("ck") / "model.ckpt"
    save_checkpoint(create_model("resnet20", 10, width=0.25), p)
    return p


def score_recipe(tmp_path, ckpt) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"name: s\nstages:\n  - score: {{checkpoint: {ckpt}}}\n")
    return p


def test_run_on_an_existing_out_with_another_recipe_is_refused_naming_the_key(tmp_path, small_ckpt):
    recipe, out = score_recipe(tmp_path, small_ckpt), tmp_path / "p"
    assert invoke("run", recipe, "--out", out).exit_code == 0
    assert invoke("run", recipe, "--out", out).exit_code == 0  # the same recipe: continues (all done)
    r = invoke("run", recipe, "--out", out, "--set", "score.rules=micronet")
    one_line(r, "stage 0 (score) option 'rules' was 'unset', now 'micronet'")
    recipe.write_text(recipe.read_text() + f"  - info: {{checkpoint: {small_ckpt}}}\n")  # a stage added: continues
    assert invoke("run", recipe, "--out", out).exit_code == 0


def test_two_runs_on_one_out_do_not_both_proceed(tmp_path, small_ckpt):
    recipe, out = score_recipe(tmp_path, small_ckpt), tmp_path / "p"
    out.mkdir()
    with open(out / ".edlab-pipeline.lock", "a") as f:  # what a running `edlab run` holds
        fcntl.flock(f, fcntl.LOCK_EX)
        one_line(invoke("run", recipe, "--out", out), "another edlab run")
    assert not (out / "00-score").exists()
    assert invoke("run", recipe, "--out", out).exit_code == 0  # lock released: it runs


def test_a_pipeline_killed_in_its_first_stage_continues_in_a_copy_without_its_lock_file(tmp_path, small_ckpt,
                                                                                       monkeypatch):
    """A run folder is committed or copied without its lock file (ignored, machine-local): a pipeline that
    died inside stage 0 must still be known as this recipe's folder there, and continue."""
    import shutil

    import edlab.pipeline

    recipe, out = score_recipe(tmp_path, small_ckpt), tmp_path / "p"

    def killed(name, kwargs, echo):  # dies after the stage made its folder, before it finished
        (out / "00-score").mkdir()
        (out / "00-score" / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(edlab.pipeline, "run_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        edlab.pipeline.run_pipeline(str(recipe), out=str(out))
    monkeypatch.undo()
    copy = tmp_path / "elsewhere" / "p"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.lock"))
    assert (copy / "pipeline.json").exists() and not (copy / ".edlab-pipeline.lock").exists()
    r = invoke("run", recipe, "--out", copy)
    assert r.exit_code == 0 and (copy / "00-score" / "result.json").exists(), (r.output, r.stderr)
    assert (copy / "00-score.interrupted-1" / "partial.txt").exists()  # the half-done stage kept aside


def test_every_stage_is_checked_before_any_runs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - train: {dataset: synthetic, epochs: 1}\n"
                      "  - prune: {structured: 0.3, bogus-option: 1}\n")
    r = invoke("run", recipe, "--out", tmp_path / "p")
    one_line(r, "stage 1 (prune)")
    assert not (tmp_path / "p" / "00-train").exists()
    recipe.write_text("stages:\n  - train: {dataset: synthetic, epochs: 1}\n  - prune: {optim.lrr: 0.1}\n")
    one_line(invoke("run", recipe, "--out", tmp_path / "q"), "did you mean optim.lr")


def test_the_run_commands_in_the_docs_parse(tmp_path):
    """Every `edlab run RECIPE ... --set ...` line of the docs names options its stages take."""
    from edlab.pipeline import check_stages, load_recipe

    found = 0
    for doc in [*ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        for line in doc.read_text().splitlines():
            words = line.split("#")[0].split()
            if words[:2] != ["edlab", "run"] or not words[2].startswith("recipes/"):
                continue
            sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
            check_stages(load_recipe(str(ROOT / words[2]), sets))
            found += 1
    assert found >= 2


@pytest.mark.parametrize("kind", ["file", "dangling-link", "other-folder"])
def test_a_bad_out_is_one_line(tmp_path, small_ckpt, kind):
    out = tmp_path / "o"
    if kind == "file":
        out.write_text("mine")
    elif kind == "dangling-link":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    one_line(invoke("run", score_recipe(tmp_path, small_ckpt), "--out", out), str(out))
    if kind != "other-folder":
        one_line(invoke("train", *TINY, "--epochs", "1", "--out", out), str(out))
        (tmp_path / "runs" / "a").mkdir(parents=True)
        (tmp_path / "runs" / "a" / "summary.json").write_text('{"val_accuracy": 0.5}')
        one_line(invoke("report", tmp_path / "runs", "--out", out), str(out))
    if kind == "file":  # (issue 29: NotADirectoryError / FileExistsError tracebacks)
        one_line(invoke("demo", "--out", out), str(out))
        one_line(invoke("export", small_ckpt, "--no-eval", "--out", out), str(out))
    assert kind != "file" or out.read_text() == "mine"


def test_a_failed_first_attempt_leaves_out_free(tmp_path, monkeypatch):
    """Missing data stops the run before training: the same command works once the data is there."""
    monkeypatch.delenv("EDLAB_DATA_DIR", raising=False)
    out = tmp_path / "run"
    args = ["--model", "resnet20", "--dataset", "cifar10", "--data-dir", tmp_path / "nodata", "--set",
            "data.download=false", "--epochs", "1", "--out", out]
    one_line(invoke("train", *args), "not found")
    assert not out.exists() or not any(out.iterdir())
    r = invoke("train", *args)  # no "exists and is not empty": the same error again
    one_line(r, "not found")


def test_recipe_keys_take_either_spelling(tmp_path):
    from edlab.pipeline import check_stages, load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - train: {dataset: synthetic, data.train_subset: 64, threads: 1}\n"
                 "  - prune: {structured: 0.2, epochs: 1, train-subset: 64, threads: 1}\n"
                 "  - quantize: {method: qat, data.train_subset: 64, train_subset: 64, threads: 1}\n")
    check_stages(load_recipe(str(p)))


def test_a_pipeline_whose_first_stage_failed_can_be_run_again(tmp_path, monkeypatch):
    monkeypatch.delenv("EDLAB_DATA_DIR", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - train: {{dataset: cifar10, data-dir: {tmp_path / 'nodata'}, "
                      f"data.download: false, epochs: 1}}\n")
    for _ in range(2):  # the second attempt meets the same cause, not "not a pipeline's folder"
        r = invoke("run", recipe, "--out", tmp_path / "p")
        assert r.exit_code == 2 and "not found" in r.stderr and "not a pipeline" not in r.stderr, r.stderr


def test_the_failed_stage_of_a_pipeline_may_be_fixed_in_the_recipe(tmp_path, small_ckpt):
    """Only finished stages are held to the recorded recipe: the stage that failed can be corrected."""
    recipe, out = tmp_path / "r.yaml", tmp_path / "p"
    recipe.write_text(f"stages:\n  - score: {{checkpoint: {small_ckpt}}}\n"
                      f"  - score: {{checkpoint: {tmp_path / 'missing.ckpt'}}}\n")
    r = invoke("run", recipe, "--out", out)
    assert r.exit_code == 2 and "stage 1 (score) failed" in r.stderr, r.stderr
    recipe.write_text(f"stages:\n  - score: {{checkpoint: {small_ckpt}}}\n  - score: {{checkpoint: {small_ckpt}}}\n")
    r = invoke("run", recipe, "--out", out)
    assert r.exit_code == 0 and "done earlier, skipped" in r.output, (r.output, r.stderr)
