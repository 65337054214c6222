"""Absurd configs and recipes: every out-of-range, mistyped or unknown value is one line and a nonzero exit,
and nothing is started.

Command lines run in-process through click's CliRunner (what `python -m edlab` runs, minus the interpreter
start-up), checking the contract of every failure: exit code != 0, one line on stderr, no traceback, and nothing
executed or destroyed."""

import pytest
from conftest import assert_one_line_error, invoke


@pytest.mark.parametrize("args,msg", [
    (["train", "--lr", "-0.1"], "optim.lr"),
    (["train", "--lr", "0"], "optim.lr"),
    (["train", "--batch-size", "0"], "data.batch_size"),
    (["train", "--epochs", "-1"], "epochs"),
    (["train", "--set", "optim.momentum=1.5"], "optim.momentum"),
    (["train", "--set", "data.val_size=-5"], "data.val_size"),
    (["train", "--set", "optim.lr=fast"], "optim.lr"),
    (["train", "--set", "epochs=[1, 2]"], "epochs"),
    (["train", "--set", "optim=3"], "optim"),
    (["train", "--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
    (["train", "--set", "optim.lrate=0.1"], "unknown config key 'optim.lrate'"),
    (["train", "--set", "nan_policy=ignore"], "nan_policy"),
    (["train", "--set", "threads=0"], "threads"),
    (["train", "--set", "data.train_subset=0"], "data.train_subset"),
    (["quantize", "CKPT", "--method", "qat", "--bits-w", "0"], "--bits-w"),
    (["quantize", "CKPT", "--method", "qat", "--bits-w", "4", "--bits-a", "1"], "--bits-a"),
    (["quantize", "CKPT", "--method", "magic"], "unknown method"),
    (["quantize", "CKPT", "--method", "qat", "--epochs", "-1"], "epochs"),
    (["quantize", "CKPT", "--method", "qat", "--set", "optim.lr=-1"], "optim.lr"),
    (["quantize", "CKPT", "--method", "qat", "--resume"], "--resume needs --out"),
    (["prune", "CKPT", "--structured", "0.6", "--unstructured", "0.5"], "must be < 1"),
    (["prune", "CKPT", "--structured", "1.5"], "fraction"),
    (["prune", "CKPT", "--structured", "-0.2"], "fraction"),
    (["prune", "CKPT", "--structured", "0.3", "--steps", "0"], "steps"),
    (["prune", "CKPT", "--structured", "0.3", "--set", "data.batch_size=0"], "data.batch_size"),
])
def test_absurd_config_is_one_line_and_nonzero_exit(ckpt, tmp_path, args, msg):
    args = [str(ckpt) if a == "CKPT" else a for a in args]
    out = tmp_path / "run"
    r = invoke(*args, "--out", out) if "--resume" not in args else invoke(*args)
    assert_one_line_error(r, msg)
    assert not out.exists() or not any(out.iterdir())  # nothing was started


def test_bad_recipe_is_one_clear_error(tmp_path):
    """Recipe errors are found before any stage runs (unknown command, YAML) or when the stage starts (its
    options): the stage's one line, then the pipeline's line saying which stage failed."""
    cases = {
        "unknown-stage": ("stages:\n  - train: {dataset: synthetic}\n  - trian: {epochs: 1}\n",
                          "stage 1 'trian' is not an edlab command"),
        "bad-flag-value": ("stages:\n  - train: {dataset: synthetic, epochs: many}\n", "epochs"),
        "bad-option": ("stages:\n  - train: {epochs: -1, dataset: synthetic}\n", "epochs"),
        "not-yaml": ("stages: [train: {\n", "not valid YAML"),
        "bad-override-type": ("stages:\n  - train: {dataset: synthetic, optim.lr: fast}\n", "optim.lr"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        r = invoke("run", tmp_path / f"{name}.yaml", "--out", tmp_path / name)
        assert r.exit_code != 0 and (r.exception is None or isinstance(r.exception, SystemExit)), name
        assert "Traceback" not in r.stderr and msg in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) <= 2, (name, r.stderr)  # the stage's line + the pipeline's
