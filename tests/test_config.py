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


@pytest.mark.parametrize("sets,msg", [
    (["distill.crop_pool=4", "data.augment=none"], "distill.crop_pool needs data.augment crop-flip"),
    (["distill.crop_pool=4", "data.crop_pad=0"], "distill.crop_pool needs data.crop_pad of at least 1"),
    (["distill.crop_pool=4", "data.cutout=8"], "distill.crop_pool excludes data.cutout"),
    (["distill.crop_pool=4", "data.mixup=0.2"], "distill.crop_pool excludes data.mixup and data.cutmix"),
    (["distill.crop_pool=4", "data.cutmix=1"], "distill.crop_pool excludes data.mixup and data.cutmix"),
    (["distill.crop_pool=-1"], "distill.crop_pool"),
    (["distill.crop_pool=65"], "distill.crop_pool"),
    (["data.cutmix=-0.5"], "data.cutmix"),
    (["data.cutmix=inf"], "data.cutmix"),
    (["data.mix_switch_prob=1.5"], "data.mix_switch_prob"),
])
def test_cutmix_and_crop_pool_options_are_validated_in_one_line(sets, msg):
    with pytest.raises(EdlabError, match=msg) as e:
        load_train_config(None, None, sets)
    assert "\n" not in str(e.value)


def test_cutmix_and_crop_pool_accepted_settings():
    cfg = load_train_config(None, None, ["data.mixup=0.2", "data.cutmix=1.0", "data.mix_switch_prob=0.3"])
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.mix_switch_prob, cfg.distill.crop_pool) == (0.2, 1.0, 0.3, 0)
    cfg = load_train_config(None, None, ["distill.crop_pool=8", "data.crop_pad=2", "data.flip=alternate"])
    assert cfg.distill.crop_pool == 8


def test_a_run_saved_before_cutmix_and_crop_pool_resumes(tmp_path):
    """A config.yaml written before data.cutmix, data.mix_switch_prob and distill.crop_pool existed is the
    same config (they were off), so --resume of such a run is not refused."""
    import yaml

    from edlab.config import to_yaml
    from edlab.train import config_change

    cfg = load_train_config(None, None, ["data.split_seed=0"])
    old = yaml.safe_load(to_yaml(cfg))
    del old["data"]["cutmix"], old["data"]["mix_switch_prob"], old["distill"]["crop_pool"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_change(tmp_path / "config.yaml", cfg) is None
    pooled = load_train_config(None, None, ["data.split_seed=0", "distill.crop_pool=4"])
    assert "distill.crop_pool: 0 saved, 4 now" in config_change(tmp_path / "config.yaml", pooled)


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
