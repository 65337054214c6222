import pytest

from edlab import EdlabError
from edlab.config import TrainConfig, load_train_config, parse_overrides


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: resnet32\noptim:\n  lr: 0.2\nepochs: 5\n")
    cfg = load_train_config(str(p), {"optim": {"lr": 0.3}}, ["data.augment=none", "optim.nesterov=false"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.model.name, cfg.optim.lr, cfg.epochs) == ("resnet32", 0.3, 5)  # flags override the file
    assert cfg.data.augment == "none" and cfg.optim.nesterov is False


def test_parse_overrides_types():
    assert parse_overrides(["a.b=1", "a.c=0.5", "d=true", "e=hello"]) == {
        "a": {"b": 1, "c": 0.5}, "d": True, "e": "hello"}


@pytest.mark.parametrize("sets,msg", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr' \\(valid here: name, lr"),
    (["optim.lr=-1"], "optim.lr"),
    (["data.batch_size=0"], "data.batch_size"),
    (["epochs=abc"], "epochs"),
    (["data.augment=blur"], "choose 'none', 'crop-flip'"),
    (["nonsense"], "key=value"),
])
def test_bad_configs_give_one_line(sets, msg):
    with pytest.raises(EdlabError, match=msg) as e:
        load_train_config(None, None, sets)
    assert "\n" not in str(e.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(EdlabError, match="not found"):
        load_train_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(EdlabError, match="not valid YAML"):
        load_train_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(EdlabError, match="mapping"):
        load_train_config(str(lst))


def test_blocks_given_as_text_are_a_list():
    """A study grid's values are scalars, so a grid over blocks per stage names them as text."""
    from pydantic import ValidationError

    from edlab.config import ModelConfig

    assert ModelConfig(blocks="[1, 2, 3]").blocks == [1, 2, 3] == ModelConfig(blocks="1,2,3").blocks
    with pytest.raises(ValidationError):
        ModelConfig(blocks="[1, a]")
