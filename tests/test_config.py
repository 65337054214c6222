import time

import pytest
from conftest import assert_one_line_error as one_line
from conftest import invoke

from edlab import EdlabError
from edlab.config import SchedConfig, TrainConfig, load_train_config, parse_overrides


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
    from edlab.stage import config_change

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
    assert ModelConfig(channels="[12, 32, 72]").channels == [12, 32, 72]
    with pytest.raises(ValidationError):
        ModelConfig(blocks="[1, a]")


# ------------------------------------------------------------------ every accepted value runs (issue 29)
# A tiny run: resnet20 at width 0.25 with one block per stage, 32 synthetic images, half an epoch, 8
# validation images, no test split. Each numeric option is run at both ends of the range its field accepts.
TINY_RUN = {"model": {"name": "resnet20", "width": 0.25, "blocks": [1, 1, 1]},
            "data": {"dataset": "synthetic", "train_subset": 32, "val_size": 8, "batch_size": 16,
                     "eval_batch_size": 16},
            "epochs": 0.5, "precision": "fp32", "threads": 1, "final_test": False, "channels_last": "off"}
# What an option needs around it to be read at all (a scheduler's knob needs that scheduler); checked
# against the config below, so a renamed key fails here instead of silently testing nothing.
CONTEXT = {"sched.step_size": {"sched.name": "step"}, "sched.gamma": {"sched.name": "step"},
           "sched.factor": {"sched.name": "plateau"}, "sched.patience": {"sched.name": "plateau"},
           "sched.pct_start": {"sched.name": "onecycle"}, "sched.start_factor": {"sched.name": "linear"},
           "sched.end_factor": {"sched.name": "linear"}, "sched.warmup_epochs": {"sched.name": "cosine"},
           "sched.min_lr": {"optim.lr": 100.0}, "distill.temperature": {"distill.teacher": "TEACHER"},
           "distill.alpha": {"distill.teacher": "TEACHER"}, "init.whiten_samples": {"init.whiten": True},
           "init.whiten_bias_epochs": {"init.whiten": True}, "lookahead_decay": {"lookahead": 1}}
LONG = {"epochs": "the run's own length: its upper end (100,000 epochs) is a long run by request, not a hang"}
LIMIT_S = 20.0  # per run; a tiny run takes well under a second


def numeric_ends() -> list[tuple[str, object]]:
    """(dotted key, value) for both ends of every numeric config field, read from its constraints: ge/le as
    given, gt/lt as the nearest accepted number, no upper bound as the largest float or int64."""
    import math
    import sys
    import typing

    import annotated_types as at
    from pydantic import BaseModel

    def walk(cls, prefix=""):
        for name, f in cls.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                yield from walk(f.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", f

    ends = []
    for key, f in walk(TrainConfig):
        kinds = {t for t in typing.get_args(f.annotation) or (f.annotation,) if t in (int, float)}
        if not kinds or not f.metadata:
            continue
        is_int = kinds == {int}
        lo = hi = None
        for m in f.metadata:
            if isinstance(m, at.Ge):
                lo = m.ge
            elif isinstance(m, at.Gt):
                lo = m.gt + 1 if is_int else math.nextafter(m.gt, math.inf)
            elif isinstance(m, at.Le):
                hi = m.le
            elif isinstance(m, at.Lt):
                hi = m.lt - 1 if is_int else math.nextafter(m.lt, -math.inf)
        hi = (2**63 - 1 if is_int else sys.float_info.max) if hi is None else hi
        ends += [(key, lo)] + ([(key, hi)] if key not in LONG else [])
    return ends


def _one_run(key: str, value, teacher: str, out: str) -> str:
    """Train TINY_RUN with ``key=value``: 'ok', 'refused: LINE', 'stopped: LINE' (EdlabError while running)."""
    import torch

    from edlab.config import build, set_dotted
    from edlab.train import train

    edits: dict = {}
    for k, v in {**CONTEXT.get(key, {}), key: value, "out": out}.items():
        set_dotted(edits, k, teacher if v == "TEACHER" else v)
    try:
        cfg = build(TrainConfig, TINY_RUN, edits)
    except EdlabError as e:
        return f"refused: {e}"
    try:
        train(cfg)
        return "ok"
    except EdlabError as e:
        return f"stopped: {e}"
    finally:
        torch.set_num_threads(1)  # (threads=1024 must not slow the runs after it)


def _worker() -> None:  # runs in a child process: one JSON line per run asked for on stdin
    import json
    import sys
    import traceback

    import edlab.train  # noqa: F401  (imported before "ready": a slow start is not a slow run)

    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        key, value, teacher, out = json.loads(line)
        try:
            result = _one_run(key, value, teacher, out)
        except Exception:
            result = "crash: " + traceback.format_exc()
        print(json.dumps(result), flush=True)


def _pump(stream, lines) -> None:
    for line in stream:
        lines.put(line)


def test_every_numeric_option_runs_at_both_ends_of_its_range(tmp_path):
    """No accepted value hangs or crashes with a traceback: each end finishes, or stops with one line
    (a NaN loss at lr 100). One child process runs them all; one that hangs is killed after LIMIT_S and a
    new child takes the rest."""
    import json
    import os
    import queue
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from edlab.checkpoint import save_checkpoint
    from edlab.models import create_model

    for key, ctx in CONTEXT.items():
        for k in (key, *ctx):
            node = TrainConfig
            for part in k.split("."):
                assert part in node.model_fields, f"CONTEXT names {k}, which the config no longer has"
                node = node.model_fields[part].annotation
    teacher = tmp_path / "teacher.ckpt"
    save_checkpoint(create_model("resnet20", width=0.25, blocks=[1, 1, 1]), teacher)
    runs = [(k, v, str(teacher), str(tmp_path / f"run{i}")) for i, (k, v) in enumerate(numeric_ends())]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    results: dict[tuple, str] = {}
    times: dict[tuple, float] = {}
    todo = list(runs)
    while todo:
        child = subprocess.Popen([sys.executable, "-c", "from test_config import _worker; _worker()"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
        assert json.loads(lines.get(timeout=120)) == "ready"
        while todo:
            run = todo.pop(0)
            child.stdin.write(json.dumps(run) + "\n")
            child.stdin.flush()
            t0 = time.perf_counter()
            try:
                results[run[:2]] = json.loads(lines.get(timeout=LIMIT_S))
            except queue.Empty:
                results[run[:2]] = f"hang: no result in {LIMIT_S:.0f} s"
                child.kill()
                break
            times[run[:2]] = time.perf_counter() - t0
        child.stdin.close()
        child.wait()
    bad = {k: v for k, v in results.items() if v.startswith(("crash", "hang"))}
    print("\n".join(f"{k}={v!r}: {r.splitlines()[0][:100]} ({times.get((k, v), 0):.1f} s)"
                    for (k, v), r in results.items()))
    assert len(results) == len(runs) > 40
    assert not bad, "\n".join(f"{k}={v!r}: {r}" for (k, v), r in bad.items())


@pytest.mark.parametrize("sets,msg", [
    (["data.mixup=inf"], "data.mixup"),
    (["data.mixup=1e9"], "data.mixup"),
    (["sched.warmup_epochs=inf"], "sched.warmup_epochs"),
    (["sched.min_lr=inf"], "sched.min_lr"),
    (["sched.min_lr=0.5"], "must not exceed optim.lr"),
    (["name=../escape"], "name"),
    (["name=/etc"], "name"),
    (["optim.betas=[0.9, 1.5]"], "beta"),
    (["optim.betas=[-0.1, 0.9]"], "beta"),
    (["seed=99999999999999999999999"], "seed"),
    (["seed=-1"], "seed"),
    (["lr=0.1"], "did you mean optim.lr"),
    (["optim.lrr=0.1"], "did you mean optim.lr"),
    (["a." * 100 + "b=1"], "section.key=value"),
])
def test_absurd_values_are_refused(sets, msg):
    with pytest.raises(EdlabError, match=msg.replace(".", r"\.").replace("[", r"\[")):
        load_train_config(None, None, sets)


def test_min_lr_is_the_floor_of_cosine():
    from edlab.optim import LRSchedule

    s = LRSchedule(SchedConfig(name="cosine", min_lr=0.01), epochs=2, steps_per_epoch=10, lr=0.1)
    assert s.factor(0) == pytest.approx(1.0) and s.factor(20) == pytest.approx(0.1)
    assert s.factor(10) == pytest.approx(0.1 + 0.9 * 0.5)


@pytest.mark.parametrize("text,msg", [
    ("a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
                                                 for p, c in zip("abcdefgh", "bcdefghi")), "too large"),
    ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
    ("a: " + "[" * 60 + "]" * 60 + "\n", "nested"),
    ("a: 1\n" + "#" * (2 << 20) + "\n", "larger than"),
])
def test_hostile_yaml_is_refused_fast(tmp_path, text, msg):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(EdlabError, match=msg):
        load_train_config(str(p))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("command", ["train", "run", "sweep"])
def test_non_utf8_and_folder_files_are_one_line(tmp_path, command):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"epochs: 1\nname: \xff\xfe\n")
    one_line(invoke(command, p), "not UTF-8")
    one_line(invoke(command, tmp_path), "is a folder")
