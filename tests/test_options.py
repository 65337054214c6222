"""Every option spelled once: each command accepts exactly what its options model (edlab.options) does, with
the model's defaults and the config's types and choices, on the command line, in a recipe and as a call."""

import pytest
from click import Context
from conftest import assert_one_line_error, invoke

from edlab.cli import cli
from edlab.config import TrainConfig
from edlab.errors import EdlabError
from edlab.options import (
    LrFindOptions,
    PruneOptions,
    QuantizeOptions,
    TrainOptions,
    config_field,
    flags_of,
    literal_choices,
    meta,
)
from edlab.stages import STAGES, stage_kwargs

MODELS = {"train": TrainOptions, "prune": PruneOptions, "quantize": QuantizeOptions, "lr-find": LrFindOptions}
RUN_CONTROL = {"sets", "resume", "out", "config", "target", "checkpoint"}  # the stage's folder, not options


def _params(command: str) -> dict:
    return {p.name: p for p in cli.get_command(Context(cli), command).params}


@pytest.mark.parametrize("command", MODELS)
def test_each_command_accepts_exactly_its_model(command):
    model = MODELS[command]
    params = _params(command)
    assert set(params) - RUN_CONTROL == set(model.model_fields) - RUN_CONTROL
    for name, field in model.model_fields.items():
        p = params[name]
        assert set(flags_of(name, field)) <= set(p.opts), (command, name, p.opts)
        if not field.is_required() and field.default not in (None, ()):
            assert p.default == field.default, (command, name)  # the default is the model's


@pytest.mark.parametrize("command", MODELS)
def test_config_options_take_the_configs_type_and_choices(command):
    """An option that sets a config key shows the config's choices and parses to the config's type
    (`--scheduler linear` was once refused while `sched.name: linear` was valid)."""
    params = _params(command)
    for name, field in MODELS[command].model_fields.items():
        key = meta(field).get("config")
        choices = literal_choices(config_field(key).annotation if key else field.annotation)
        if choices:
            assert params[name].metavar == "[" + "|".join(choices) + "]", (command, name)
    if command == "train":
        assert "linear" in literal_choices(config_field("sched.name").annotation)
        epochs = params["epochs"].type
        assert epochs.convert("0.5", None, None) == 0.5 and epochs.convert("2", None, None) == 2
        assert set(TrainOptions.config_flags().values()) <= {f"{s}.{k}" if s else k for s, k in _config_keys()}


def _config_keys():
    for name, f in TrainConfig.model_fields.items():
        sub = f.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            yield from ((name, k) for k in sub.model_fields)
        else:
            yield None, name


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_a_recipe_stage_accepts_every_spelling_of_the_model(command):
    model = MODELS[command]
    aliases = STAGES[command].all_aliases()
    for name, field in model.model_fields.items():
        for flag in flags_of(name, field):
            kw = stage_kwargs(command, {flag[2:]: 1}, "m.ckpt", "o")
            assert name in kw, (command, flag)
    assert stage_kwargs("prune", {"global": True}, "m.ckpt")["global_pruning"] is True
    assert aliases.get("no-keep-first-last") == ("keep_first_last", False) or command == "prune"
    with pytest.raises(EdlabError, match="No such option: bogus"):
        stage_kwargs(command, {"bogus": 1}, "m.ckpt")


@pytest.mark.parametrize("call,msg", [
    (lambda: __import__("edlab").prune_checkpoint("no-such.ckpt", structured=0.3, bogus=1), "unknown option 'bogus'"),
    (lambda: __import__("edlab").prune_checkpoint("no-such.ckpt", structured=0.3, importance="l3"),
     "unknown importance 'l3'"),
    (lambda: __import__("edlab").prune_checkpoint("no-such.ckpt", structured=0.3, batch_size=0), "data.batch_size"),
    (lambda: __import__("edlab").quantize_checkpoint("no-such.ckpt", "qat", bits_w=1), "--bits-w"),
    (lambda: __import__("edlab").quantize_checkpoint("no-such.ckpt", "qat", precision="fp8"), "unknown option"),
    (lambda: __import__("edlab").train_run(lr=-1), "optim.lr"),
    (lambda: __import__("edlab").find_lr(start=1.0, end=0.5), "--start must be below --end"),
])
def test_a_call_checks_its_options_before_touching_a_file(call, msg):
    """The library functions validate through the same model: a wrong option is named before the (missing)
    checkpoint is read."""
    with pytest.raises(EdlabError, match=msg):
        call()


@pytest.mark.parametrize("args,msg", [
    (["quantize", "CKPT", "--method", "qat", "--precision", "bf16"], "No such option"),  # not quantize's
    (["prune", "CKPT", "--structured", "0.3", "--importance", "l3"], "unknown importance 'l3'"),
    (["prune", "CKPT", "--structured", "0.3", "--precision", "fp8"], "config key 'precision'"),
    (["quantize", "CKPT"], "--method is required"),
])
def test_a_wrong_choice_is_one_line(args, msg, tmp_path):
    r = invoke(*[str(tmp_path / "m.ckpt") if a == "CKPT" else a for a in args])
    if msg == "No such option":  # click's own usage error: not one line, but nothing runs
        assert r.exit_code == 2 and msg in r.output
        return
    assert_one_line_error(r, msg)
