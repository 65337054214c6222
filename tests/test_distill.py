"""Distillation in every training stage: the loss, the teacher-logit cache, train/prune/quantize flags, and
(slow, real data) a distilled small student against the same student trained alone."""

import json
import math
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import cifar_dir, kill_after_epoch

import edlab.distill as distill_mod
import edlab.train as train_mod
from edlab.augment import crop_pool
from edlab.checkpoint import load_checkpoint, save_checkpoint
from edlab.cli import cli
from edlab.config import load_train_config
from edlab.data import data_from_config
from edlab.distill import distill_loss
from edlab.models import create_model
from edlab.quantize import stage_config
from edlab.train import fit, train

pytestmark = pytest.mark.usefixtures("threads_from_env")  # (conftest)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


class Constant(nn.Module):
    """A 'teacher' that answers class ``k`` for every image, whatever the labels say."""

    def __init__(self, k: int, classes: int = 10):
        super().__init__()
        self.register_buffer("logits", F.one_hot(torch.tensor(k), classes).float() * 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.logits.expand(len(x), -1)


def test_distill_loss_is_hinton_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    hard = F.cross_entropy(s, y)
    temp, alpha = 3.0, 0.7
    p_t = F.softmax(t / temp, 1)  # KL(p_t || p_s), written out
    kl = (p_t * (p_t.log() - F.log_softmax(s / temp, 1))).sum(1).mean()
    assert distill_loss(s, t, hard, temp, alpha) == pytest.approx(float(alpha * temp ** 2 * kl + (1 - alpha) * hard),
                                                                  rel=1e-5)
    assert distill_loss(s, t, hard, temp, 0.0) == pytest.approx(float(hard))
    assert float(distill_loss(t, t, hard * 0, temp, 1.0)) == pytest.approx(0.0, abs=1e-6)  # teacher matched


def test_distillation_changes_what_the_student_learns(tiny_cfg):
    """alpha = 1 with a teacher that always says class 3: the student learns to say 3, not the labels; with
    alpha = 0 the same teacher has no effect and the student learns the labels."""
    results = {}
    for alpha in (0.0, 1.0):
        cfg = tiny_cfg(epochs=1, **{"distill.alpha": alpha, "data.augment": "crop-flip", "data.train_subset": 256})
        data = data_from_config(cfg, torch.device("cpu"))
        torch.manual_seed(0)
        model = create_model("resnet20", width=0.25)
        fit(model, data, cfg, teacher=Constant(3))
        model.eval()
        x, y = next(iter(data.val))
        pred = model(x).argmax(1)
        results[alpha] = float((pred == 3).float().mean())
    assert results[1.0] > 0.95 and results[0.0] < 0.5


def _fit_with_teacher(cfg, teacher, cache: bool, monkeypatch):
    views = distill_mod.cached_views
    monkeypatch.setattr(distill_mod, "cached_views", lambda loader: views(loader) if cache else 0)
    data = data_from_config(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model("resnet20", width=0.25)
    inputs = []
    hook = teacher.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    state = fit(model, data, cfg, teacher=teacher)
    hook.remove()
    return model, state, inputs, data


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_teacher_logits_cached_without_augmentation_equal_on_the_fly(tiny_cfg, monkeypatch):
    """augment none, no mixup: the teacher runs once per image (its logits a table read by index), and the
    training is the same as running it on every batch."""
    teacher = create_model("resnet20", width=0.25).eval()
    cfg = tiny_cfg(epochs=2, **{"data.augment": "none", "distill.temperature": 2.0, "data.train_subset": 256})
    cached, s1, in1, data = _fit_with_teacher(cfg, teacher, True, monkeypatch)
    fly, s2, in2, _ = _fit_with_teacher(cfg, teacher, False, monkeypatch)
    n, steps = len(data.train.split), len(data.train)
    assert sum(len(x) for x in in1) == n and len(in1) == math.ceil(n / 1000)  # one pass over the images
    assert len(in2) == 2 * steps  # every step of both epochs
    for a, b in zip(cached.state_dict().values(), fly.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)
    assert s1.history[-1]["train_loss"] == pytest.approx(s2.history[-1]["train_loss"], rel=1e-4)


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_teacher_logits_cached_for_flips_only_equal_on_the_fly(tiny_cfg, monkeypatch):
    """crop-flip with crop_pad 0 (mirrors only, random or alternating): the teacher runs once on every image
    and once on its mirror, and the training is the same as running it on every batch."""
    teacher = create_model("resnet20", width=0.25).eval()
    for flip in ("random", "alternate"):
        cfg = tiny_cfg(epochs=2, **{"data.augment": "crop-flip", "data.crop_pad": 0, "data.flip": flip,
                                    "distill.temperature": 2.0, "data.train_subset": 256})
        cached, s1, in1, data = _fit_with_teacher(cfg, teacher, True, monkeypatch)
        fly, s2, in2, _ = _fit_with_teacher(cfg, teacher, False, monkeypatch)
        n, steps = len(data.train.split), len(data.train)
        assert sum(len(x) for x in in1) == 2 * n  # every image and its mirror, once
        assert len(in2) == 2 * steps
        for a, b in zip(cached.state_dict().values(), fly.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-4)
        assert s1.history[-1]["train_loss"] == pytest.approx(s2.history[-1]["train_loss"], rel=1e-4)


def test_saved_teacher_table_is_read_back_only_when_it_matches(tiny_cfg, tmp_path):
    """The teacher's cached logits are kept in the run folder for a resume, and read back only for the same
    teacher, the same inputs and the same views; a changed teacher or a torn file is recomputed, silently."""
    cfg = tiny_cfg(**{"data.augment": "crop-flip", "data.crop_pad": 0, "data.train_subset": 128})
    data = data_from_config(cfg, torch.device("cpu"))
    teacher = create_model("resnet20", width=0.25).eval()
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    path = tmp_path / distill_mod.TABLE_FILE
    first, reused = distill_mod.saved_teacher_table(teacher, data.train, None, 2, path)
    assert not reused and path.exists() and sum(calls) == 2 * 128 and first.shape == (128, 2, 10)
    calls.clear()
    again, reused = distill_mod.saved_teacher_table(teacher, data.train, None, 2, path)
    assert reused and calls == [] and torch.equal(again, first)
    one, reused = distill_mod.saved_teacher_table(teacher, data.train, None, 1, path)  # other views
    assert not reused and one.shape == (128, 10) and torch.allclose(one, first[:, 0], atol=1e-5)
    with torch.no_grad():
        next(teacher.parameters()).add_(0.5)  # another teacher
    calls.clear()
    other, reused = distill_mod.saved_teacher_table(teacher, data.train, None, 1, path)
    assert not reused and sum(calls) == 128 and not torch.allclose(other, one)
    path.write_bytes(b"torn")
    _, reused = distill_mod.saved_teacher_table(teacher, data.train, None, 1, path)
    assert not reused and torch.load(path, weights_only=True)["table"].shape == (128, 10)


def test_another_run_with_the_same_key_reads_the_shared_table(tiny_cfg, tmp_path):
    """A table also goes to the shared cache under its key: a second run of the same teacher over the same
    split (another --out) reads it there instead of calling the teacher, and keeps its own copy for a resume;
    another teacher misses it. The cache keeps the newest SHARED_TABLES tables."""
    cfg = tiny_cfg(**{"data.augment": "crop-flip", "data.crop_pad": 0, "data.train_subset": 128})
    data = data_from_config(cfg, torch.device("cpu"))
    teacher = create_model("resnet20", width=0.25).eval()
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    shared = tmp_path / "shared"
    first, source = distill_mod.saved_teacher_table(teacher, data.train, None, 2, tmp_path / "a" / "t.pt",
                                                    shared=shared)
    assert source is None and sum(calls) == 2 * 128 and len(list(shared.glob("*.pt"))) == 1
    calls.clear()
    again, source = distill_mod.saved_teacher_table(teacher, data.train, None, 2, tmp_path / "b" / "t.pt",
                                                    shared=shared)
    assert calls == [] and torch.equal(again, first) and source.parent == shared
    assert (tmp_path / "b" / "t.pt").exists()  # its own copy: a resume needs no cache
    with torch.no_grad():
        next(teacher.parameters()).add_(0.5)
    _, source = distill_mod.saved_teacher_table(teacher, data.train, None, 2, None, shared=shared)
    assert source is None and sum(calls) == 2 * 128 and len(list(shared.glob("*.pt"))) == 2
    for i in range(distill_mod.SHARED_TABLES):  # older tables go first
        torch.save({}, shared / f"old{i}.pt")
        os.utime(shared / f"old{i}.pt", (1, 1))
    distill_mod.saved_teacher_table(teacher, data.train, None, 1, None, shared=shared)
    assert len(list(shared.glob("*.pt"))) == distill_mod.SHARED_TABLES


def test_a_run_resumed_from_its_own_table_seeds_the_shared_cache(tiny_cfg, tmp_path):
    """A run whose table was made before the cache existed (or on another machine) reads its own copy on
    --resume and puts it in the cache, so the next run of the same teacher does not call it again."""
    cfg = tiny_cfg(**{"data.augment": "crop-flip", "data.crop_pad": 0, "data.train_subset": 128})
    data = data_from_config(cfg, torch.device("cpu"))
    teacher = create_model("resnet20", width=0.25).eval()
    own = tmp_path / "long" / "t.pt"
    first, _ = distill_mod.saved_teacher_table(teacher, data.train, None, 2, own)  # no cache then
    shared = tmp_path / "shared"
    _, source = distill_mod.saved_teacher_table(teacher, data.train, None, 2, own, shared=shared)
    assert source == own and len(list(shared.glob("*.pt"))) == 1
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    again, source = distill_mod.saved_teacher_table(teacher, data.train, None, 2, tmp_path / "qat" / "t.pt",
                                                    shared=shared)
    assert calls == [] and source.parent == shared and torch.equal(again, first)


def test_a_distilled_run_reads_a_finished_runs_table_from_the_cache(tiny_cfg, tmp_path, capsys):
    """Two `edlab train` runs of one teacher over one split: the second says where it read the table."""
    from rich.console import Console

    save_checkpoint(create_model("resnet20", width=0.25), tmp_path / "t.ckpt")
    sets = {"data.augment": "crop-flip", "data.crop_pad": 0, "data.train_subset": 128, "epochs": 1,
            "distill.teacher": str(tmp_path / "t.ckpt")}
    train(tiny_cfg(out=str(tmp_path / "one"), **sets))
    passes = []
    real = distill_mod.teacher_table
    distill_mod.teacher_table = lambda *a, **k: passes.append(1) or real(*a, **k)
    try:
        train(tiny_cfg(out=str(tmp_path / "two"), **sets), console=Console(width=300))
    finally:
        distill_mod.teacher_table = real
    out = capsys.readouterr().out
    assert passes == [] and f"read back from {distill_mod.shared_table_dir()}" in out.replace("\n", "")


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_resume_reads_the_teacher_table_back_and_finishes_as_if_never_killed(tiny_cfg, tmp_path):
    save_checkpoint(create_model("resnet20", width=0.25), tmp_path / "t.ckpt")
    sets = {"data.augment": "crop-flip", "data.crop_pad": 0, "data.train_subset": 128, "epochs": 3,
            "distill.teacher": str(tmp_path / "t.ckpt")}
    full = tiny_cfg(out=str(tmp_path / "full"), **sets)
    m_full, _ = train(full)
    assert not (tmp_path / "full" / distill_mod.TABLE_FILE).exists()  # a finished run keeps no table

    cut = tiny_cfg(out=str(tmp_path / "cut"), **sets)
    kill_after_epoch(cut, 2)
    assert (tmp_path / "cut" / distill_mod.TABLE_FILE).exists()
    passes = []
    real = distill_mod.teacher_table
    distill_mod.teacher_table = lambda *a, **k: passes.append(1) or real(*a, **k)
    try:
        m_res, _ = train(cut, resume=True)
    finally:
        distill_mod.teacher_table = real
    assert passes == []  # read back, not recomputed
    assert not (tmp_path / "cut" / distill_mod.TABLE_FILE).exists()
    for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()):
        assert torch.equal(a, b)


class Projection(nn.Module):
    """A 'teacher' whose logits are a fixed random projection of its input: they tell which crop and mirror
    of which image it was shown."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.register_buffer("p", torch.randn(3 * 32 * 32, classes, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.float().flatten(1) @ self.p


def _record_steps(monkeypatch, model):
    """(student input, teacher logits) of every training step of ``model``."""
    inputs, logits = [], []
    model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()) if m.training else None)
    real = distill_mod.distill_loss
    monkeypatch.setattr(distill_mod, "distill_loss", lambda s, t, *a: logits.append(t.clone()) or real(s, t, *a))
    return inputs, logits


@pytest.mark.parametrize("flip", ["random", "alternate"])
def test_the_student_sees_the_pooled_crop_whose_teacher_logits_it_learns_from(tiny_cfg, monkeypatch, flip):
    """distill.crop_pool 3: the teacher runs once, on every image's 3 pooled crops and their mirrors (and
    never in a step), and in every step the logits the loss reads are the teacher's answer for the very
    tensor the student is shown; across epochs the images show more than one pooled view."""
    teacher = Projection()
    calls = []
    teacher.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    cfg = tiny_cfg(epochs=2, **{"data.train_subset": 128, "data.batch_size": 32, "distill.crop_pool": 3,
                                "data.crop_pad": 2, "data.flip": flip})
    data = data_from_config(cfg, torch.device("cpu"))
    model = create_model("resnet20", width=0.25)
    inputs, logits = _record_steps(monkeypatch, model)
    views = []
    real_rows = distill_mod.table_rows
    monkeypatch.setattr(distill_mod, "table_rows", lambda t, loader: views.append(
        (loader.index.clone(), loader.view.clone(), loader.mirrored.clone())) or real_rows(t, loader))
    fit(model, data, cfg, teacher=teacher)
    assert sum(calls) == 128 * 3 * 2 and len(inputs) == len(logits) == 2 * len(data.train)
    for x, t in zip(inputs, logits):
        assert torch.allclose(teacher(x), t, atol=1e-3)
    shown = {(int(i), int(v), bool(m)) for idx, view, mir in views for i, v, m in zip(idx, view, mir)}
    assert len(shown) > 128 and {v for _, v, _ in shown} == {0, 1, 2}


def test_a_crop_pool_run_resumes_as_if_never_killed_without_calling_the_teacher(tiny_cfg, tmp_path, monkeypatch):
    """Killed after epoch 2 of 3: the resumed run regenerates the same pool from the seed, reads the teacher's
    pooled logits back from teacher-table.pt (the teacher is never called) and ends with the uninterrupted
    run's weights, bit for bit. Another pool (another seed's crops) does not match the saved key."""
    save_checkpoint(create_model("resnet20", width=0.25), tmp_path / "t.ckpt")
    sets = {"data.train_subset": 128, "data.batch_size": 32, "epochs": 3, "distill.crop_pool": 2,
            "distill.teacher": str(tmp_path / "t.ckpt")}
    m_full, _ = train(tiny_cfg(out=str(tmp_path / "full"), **sets))
    cut = tiny_cfg(out=str(tmp_path / "cut"), **sets)
    kill_after_epoch(cut, 2)
    saved = torch.load(tmp_path / "cut" / distill_mod.TABLE_FILE, weights_only=True)
    assert saved["table"].shape == (128, 2, 2, 10)
    calls = []
    real = distill_mod.load_teacher

    def spied(*a, **k):
        t = real(*a, **k)
        t.register_forward_pre_hook(lambda m, x: calls.append(len(x[0])))
        return t

    monkeypatch.setattr(distill_mod, "load_teacher", spied)
    m_res, _ = train(cut, resume=True)
    assert calls == []  # read back: the teacher never ran
    for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()):
        assert torch.equal(a, b)

    data = data_from_config(cut, torch.device("cpu"))
    teacher = load_checkpoint(tmp_path / "t.ckpt").eval()
    path = tmp_path / "table.pt"
    pool = crop_pool(128, 2, 4, 0)
    first, reused = distill_mod.saved_teacher_table(teacher, data.train, None, 4, path, pool=pool)
    assert not reused and first.shape == (128, 2, 2, 10)
    assert distill_mod.saved_teacher_table(teacher, data.train, None, 4, path, pool=pool)[1]
    other, reused = distill_mod.saved_teacher_table(teacher, data.train, None, 4, path,
                                                  pool=crop_pool(128, 2, 4, 1))
    assert not reused and not torch.allclose(other, first)


def test_a_stage_after_a_pooled_student_does_not_inherit_its_crop_pool():
    """prune and quantize drop the student's own teacher from its saved config, and its crop pool with it:
    a later stage may then mix its batches (a pool would refuse that)."""
    from edlab.prune import finetune_config

    model = create_model("resnet20", width=0.25)
    model.edlab_metadata = {"config": {"data": {"dataset": "synthetic"},
                                       "distill": {"teacher": "t.ckpt", "crop_pool": 4}}}
    q = stage_config(model, "m.ckpt", "qat", {}, ["data.cutmix=1.0"])
    assert q.distill.crop_pool == 0 and q.distill.teacher is None and q.data.cutmix == 1.0
    p = finetune_config(model, {}, ["data.mixup=0.2"], epochs=1)
    assert p.distill.crop_pool == 0 and p.data.mixup == 0.2


def test_which_batches_can_cache_the_teacher():
    """Only batches whose views are fixed: stored images (1 view) or image and mirror (2); a crop, a warp or
    cutout makes every epoch's view new."""
    from edlab.augment import Augment

    def views(policy, **kw):
        return distill_mod.cached_views(SimpleNamespace(augment=Augment(policy, (0.5,) * 3, (0.25,) * 3, **kw)))
    assert views("none") == 1
    assert views("crop-flip", crop_pad=0) == 2 and views("crop-flip", crop_pad=0, flip="alternate") == 2
    assert views("crop-flip") == 0 and views("fancy") == 0 and views("scale-rotate") == 0
    assert views("none", cutout=8) == 0 and views("crop-flip", crop_pad=0, cutout=8) == 0


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_teacher_sees_the_students_augmented_batch(tiny_cfg, monkeypatch):
    teacher = create_model("resnet20", width=0.25).eval()
    student_inputs = []
    cfg = tiny_cfg(epochs=1, **{"data.augment": "crop-flip", "data.mixup": 0.5})
    data = data_from_config(cfg, torch.device("cpu"))
    model = create_model("resnet20", width=0.25)
    model.register_forward_pre_hook(lambda m, a: student_inputs.append(a[0].clone()) if m.training else None)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    fit(model, data, cfg, teacher=teacher)
    assert len(seen) == len(data.train) and all(torch.equal(a, b) for a, b in zip(seen, student_inputs))


def test_teacher_sees_the_students_cutmixed_batch(tiny_cfg, monkeypatch):
    """CutMix with distillation (mixup beside it, one per batch): the mixing makes every view new, so no
    table is made, and the teacher is shown the very mixed tensor the student is, every step."""
    teacher = Projection()
    seen = []
    teacher.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    cfg = tiny_cfg(epochs=1, **{"data.augment": "none", "data.cutmix": 1.0, "data.mixup": 0.4,
                                "data.train_subset": 128, "data.batch_size": 16})
    data = data_from_config(cfg, torch.device("cpu"))
    model = create_model("resnet20", width=0.25)
    inputs, logits = _record_steps(monkeypatch, model)
    import edlab.augment as aug

    kinds = []
    for name in ("cutmix", "mixup"):
        real = getattr(aug, name)
        monkeypatch.setattr(aug, name, lambda *a, real=real, name=name: kinds.append(name) or real(*a))
    fit(model, data, cfg, teacher=teacher)
    assert len(seen) == len(inputs) == len(logits) == len(data.train) == len(kinds)
    assert set(kinds) == {"cutmix", "mixup"}
    assert all(torch.equal(a, b) for a, b in zip(seen, inputs))
    assert all(torch.equal(teacher(x), t) for x, t in zip(inputs, logits))


def _fits(monkeypatch):
    """Record the teacher each fit() call receives (prune and quantize import fit from edlab.train)."""
    teachers = []
    real = train_mod.fit

    def spy(*args, **kwargs):
        teachers.append(kwargs.get("teacher"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "fit", spy)
    return teachers


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_prune_and_quantize_take_a_teacher(tiny_ckpt, tmp_path, monkeypatch):
    teachers = _fits(monkeypatch)
    r = invoke("prune", tiny_ckpt, "--unstructured", "0.3", "--finetune-epochs", "1", "--train-subset", "64",
               "--teacher", tiny_ckpt, "--temperature", "2", "--alpha", "0.5", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    cfg = (tmp_path / "p" / "config.yaml").read_text()
    assert f"teacher: {tiny_ckpt}" in cfg and "temperature: 2.0" in cfg and "alpha: 0.5" in cfg
    assert len(teachers) == 1 and teachers[0] is not None and not teachers[0].training

    r = invoke("quantize", tmp_path / "p" / "model.ckpt", "--method", "qat", "--epochs", "1", "--bits-w", "4",
               "--set", "data.train_subset=64", "--teacher", tiny_ckpt, "--out", tmp_path / "q")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert s["options"]["teacher"] == str(tiny_ckpt) and s["options"]["temperature"] == 4.0
    assert len(teachers) == 2 and teachers[1] is not None

    r = invoke("quantize", tiny_ckpt, "--method", "binaryconnect", "--epochs", "1", "--distill",
               "--set", "data.train_subset=64", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["options"]["teacher"] == "source"
    src = load_checkpoint(tiny_ckpt)  # the float source teaches: same weights as the checkpoint
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), teachers[2].cpu().state_dict().values()))

    distilled = load_checkpoint(tmp_path / "q" / "model.ckpt")  # a student's own teacher is not inherited
    assert distilled.edlab_metadata["config"]["distill"]["teacher"] == str(tiny_ckpt)
    assert stage_config(distilled, "q.ckpt", "qat", {}, []).distill.teacher is None


def test_train_flags_and_saved_teacher_not_inherited(tiny_ckpt, tmp_path, monkeypatch):
    teachers = _fits(monkeypatch)
    r = invoke("train", "--model", "resnet20", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "128",
               "--precision", "fp32", "--set", "model.width=0.25", "--set", "model.blocks=[1,1,1]",
               "--teacher", tiny_ckpt, "--alpha", "0.8", "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    student = load_checkpoint(tmp_path / "s" / "model.ckpt")
    assert student.edlab_metadata["config"]["distill"] == {"teacher": str(tiny_ckpt), "temperature": 4.0,
                                                           "alpha": 0.8, "crop_pool": 0}
    assert [len(s) for s in student.layers] == [1, 1, 1] and teachers[0] is not None


@pytest.mark.parametrize("args,msg", [
    (["quantize", "--method", "bf16", "--distill"], "does not train"),
    (["quantize", "--method", "qat", "--distill", "--teacher", "X"], "not both"),
    (["quantize", "--method", "qat", "--teacher", "missing.ckpt", "--set", "data.train_subset=64"],
     "teacher checkpoint not found"),
    (["prune", "--unstructured", "0.2", "--teacher", "missing.ckpt", "--train-subset", "64"],
     "teacher checkpoint not found"),
    (["prune", "--unstructured", "0.2", "--distill", "--teacher", "X", "--train-subset", "64"], "not both"),
])
def test_bad_distillation_input_is_one_line(tiny_ckpt, args, msg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(args[0], tiny_ckpt, *args[1:])
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # refused before any run folder is made


def test_teacher_with_other_classes_is_refused(tmp_path, tiny_cfg):
    save_checkpoint(create_model("resnet20", num_classes=100, width=0.25), tmp_path / "t100.ckpt")
    cfg = tiny_cfg(epochs=1, **{"distill.teacher": str(tmp_path / "t100.ckpt")})
    with pytest.raises(Exception, match="predicts 100 classes, the data has 10"):
        train(cfg)


# ------------------------------------------------------------------------------------- slow, real data
@pytest.mark.slow
@pytest.mark.skipif(cifar_dir() is None, reason="needs CIFAR-10 in $EDLAB_DATA_DIR")
def test_distilled_small_student_beats_the_student_alone(tmp_path):
    """CIFAR-10, 5,000 training images, the 5,000-image validation split, one CPU thread. The teacher is the
    deck's resnet20 (docs/results/deck/resnet20: 30 epochs on the 45,000 other images, val 87.0 %), trained
    beside this very split, so it saw none of the validation images (the student's summary says 0). The same
    tiny student (depthwise blocks [1, 1, 1], width 0.5: 4,538 parameters) trains 10 epochs on the plain
    images, alone and distilled (T = 4, alpha = 0.9; the plain images make the teacher's logits a per-image
    table, computed once). The distilled student validates higher (docs/training.md has the figures).
    Reusing a committed teacher keeps this claim cheap enough for CI (it trained its own before)."""
    teacher = Path(__file__).resolve().parents[1] / "docs/results/deck/resnet20/model.ckpt"
    common = ["data.train_subset=5000", "data.batch_size=128", "data.val_size=5000", "optim.lr=0.1",
              "sched.warmup_epochs=1", "epochs=10", "precision=auto", "threads=1", f"data.data_dir={cifar_dir()}",
              "model.name=resnet20", "model.blocks=[1,1,1]", "model.conv=depthwise", "model.width=0.5",
              "data.augment=none"]
    results = {}
    for name, extra in (("alone", []), ("distilled", [f"distill.teacher={teacher}"])):
        _, results[name] = train(load_train_config(None, None, common + extra + [f"out={tmp_path / name}"]))
    for name, s in results.items():
        print(f"{name}: params {s['params']} val {100 * s['val_accuracy']:.2f} test {100 * s['test_accuracy']:.2f} "
              f"seconds {s['seconds']:.0f}")
    assert results["distilled"]["val_accuracy"] > results["alone"]["val_accuracy"]
    assert results["distilled"]["params"] == results["alone"]["params"]
    assert results["distilled"]["teacher_val_leak"] == 0


@pytest.mark.slow  # tens of seconds on 2 cores: CI runs it (scripts/test.sh), the default suite not
def test_a_recipe_distils_in_every_stage(tiny_ckpt, tmp_path, monkeypatch):
    """The options of a recipe stage are its command's flags: teacher/temperature/alpha reach train, prune
    and quantize; a small student with blocks per stage is a `model.blocks` key."""
    import yaml

    from edlab.pipeline import run_pipeline

    teachers = _fits(monkeypatch)
    small = {"dataset": "synthetic", "train-subset": 64, "precision": "fp32"}
    recipe = {"name": "distil", "stages": [
        {"train": {"model": "resnet20", "epochs": 1, "model.width": 0.25, "model.blocks": [1, 1, 1],
                   "teacher": str(tiny_ckpt), "temperature": 2, **small}},
        {"prune": {"unstructured": 0.3, "finetune-epochs": 1, "teacher": str(tiny_ckpt), "alpha": 0.5, **small}},
        {"quantize": {"method": "qat", "bits-w": 4, "epochs": 1, "teacher": str(tiny_ckpt), "fold-bn": True,
                      "layer-bits": "first=8,last=8", "data.train_subset": 64}},
    ]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = run_pipeline(str(tmp_path / "r.yaml"), out=str(tmp_path / "run"))
    assert [st["name"] for st in r["stages"]] == ["train", "prune", "quantize"]
    assert len(teachers) == 3 and all(t is not None for t in teachers)
    final = load_checkpoint(tmp_path / "run" / "02-quantize" / "model.ckpt")
    assert [len(s) for s in final.layers] == [1, 1, 1] and final.conv1.weight_bits == 8
    kept = json.loads((tmp_path / "run" / "02-quantize" / "summary.json").read_text())["options"]["fold_bn"]["kept"]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in final.modules()) == len(kept)


def test_a_teacher_that_trained_on_the_validation_images_is_warned_about_counted_and_remembered(tiny_cfg, tmp_path):
    """Evaluation hygiene: the student's validation split must be held out from its teacher too. A teacher
    trained beside the same split passes quietly (0 images); one trained on every image is named, with the
    count of validation images it saw, in a warning and in the summary.

    What a teacher learnt of the validation images stays in its student and in every model made from it:
    the student's checkpoint records the count in its stage history, and a prune and a quantization of it
    (no teacher of their own) report it as val_leak; a quantization given the leaky teacher directly counts
    it as its own (options.teacher_val_leak). A student of a clean teacher passes on 0. (64 training images a
    run: the counts come from the splits, not from what was learnt.)"""
    small = {"data.train_subset": 64}
    _, same = train(tiny_cfg(epochs=1, **small, out=str(tmp_path / "t-same")))
    _, whole = train(tiny_cfg(epochs=1, **small, **{"data.val_size": 0, "out": str(tmp_path / "t-whole")}))
    assert whole["best_val_accuracy"] is None
    teacher = str(tmp_path / "t-whole" / "model.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a teacher of the same split
        _, s = train(tiny_cfg(epochs=1, **small, **{"distill.teacher": str(tmp_path / "t-same" / "model.ckpt"),
                                                     "out": str(tmp_path / "s-same")}))
    assert s["teacher_val_leak"] == 0
    with pytest.warns(UserWarning, match=r"200 of its images were training images of the teacher .*t-whole"):
        _, s = train(tiny_cfg(epochs=1, **small, **{"distill.teacher": teacher, "out": str(tmp_path / "s-whole")}))
    assert s["teacher_val_leak"] == 200 and s["teacher"].endswith("model.ckpt")

    # the leaky student's later stages
    assert s["teacher_val_leak"] == 200 and s["val_leak"] == 200
    student = tmp_path / "s-whole" / "model.ckpt"
    assert load_checkpoint(student).edlab_metadata["stages"][-1]["teacher_val_leak"] == 200
    r = invoke("prune", student, "--unstructured", "0.3", "--finetune-epochs", "0", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    p = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert p["val_leak"] == 200 and "teacher" not in p
    r = invoke("quantize", tmp_path / "p" / "model.ckpt", "--method", "fp16", "--out", tmp_path / "q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["val_leak"] == 200

    clean = same  # a teacher-less run of the same split
    assert clean["val_leak"] == 0 and "teacher" not in clean
    r = invoke("quantize", tmp_path / "t-same" / "model.ckpt", "--method", "qat", "--bits-w", "4", "--epochs", "1",
               "--teacher", teacher, "--set", "data.train_subset=64", "--out", tmp_path / "qt")
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "qt" / "summary.json").read_text())
    assert q["options"]["teacher_val_leak"] == 200 and q["val_leak"] == 200
