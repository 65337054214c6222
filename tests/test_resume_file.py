"""resume.pt: checksummed (a flipped byte refuses to resume), malformed or incomplete state is one line,
--resume says from which epoch it continues and which config key differs, and a full disk is one line that
keeps the files written before."""

import errno
import random
import shutil

import pytest
import torch
from conftest import TINY_TRAIN as TINY  # (the same tiny run and runner)
from conftest import assert_one_line_error as one_line
from conftest import invoke

from edlab import EdlabError
from edlab.config import SchedConfig


def _resume_file(tmp_path, **state):
    from edlab.optim import LRSchedule
    from edlab.resume import FitState, save_resume

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = LRSchedule(SchedConfig(), 3, 10)
    path = tmp_path / "resume.pt"
    save_resume(path, model, opt, sched, FitState(**state), None)
    return path, model, opt, sched


def _load(path, epochs=3):
    from edlab.optim import LRSchedule
    from edlab.resume import load_resume

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return load_resume(path, model, opt, LRSchedule(SchedConfig(), 3, 10), None, None, epochs), model


def test_resume_state_is_checksummed(tmp_path):
    path, model, *_ = _resume_file(tmp_path, epoch=1, history=[{"epoch": 1}])
    state, loaded = _load(path)
    assert state.epoch == 1 and torch.equal(loaded.weight, model.weight)
    raw = path.read_bytes()
    rng = random.Random(0)
    for pos in rng.sample(range(len(raw)), 60):  # before the checksum, 21 of 60 random flips loaded
        bad = bytearray(raw)
        bad[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        with pytest.raises(EdlabError, match="resume state"):
            _load(path)


@pytest.mark.parametrize("state,msg", [
    ({"epoch": -1}, "malformed"),
    ({"epoch": 7, "history": [{}] * 7}, "malformed"),  # more epochs than the run has
    ({"epoch": 2, "history": [{}]}, "malformed"),
    ({"epoch": "2"}, "malformed"),
])
def test_malformed_resume_state_is_one_line(tmp_path, state, msg):
    path, *_ = _resume_file(tmp_path, **state)
    with pytest.raises(EdlabError, match=msg):
        _load(path)


def test_resume_with_missing_keys_is_one_line(tmp_path):
    import hashlib
    import io

    from edlab.resume import RESUME_MAGIC

    buf = io.BytesIO()
    torch.save({"model": {}, "state": {"epoch": 1}}, buf)
    body = buf.getvalue()
    (tmp_path / "resume.pt").write_bytes(RESUME_MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(EdlabError, match="malformed"):
        _load(tmp_path / "resume.pt")


def test_resume_says_from_which_epoch(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)  # a finished run of TINY (conftest)
    r = invoke("train", *TINY, "--epochs", "1", "--out", out, "--resume")
    assert r.exit_code == 0 and "resuming from epoch 1 of 1" in r.output, r.output


def test_resume_says_which_key_differs(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)  # a finished run of TINY (conftest)
    one_line(invoke("train", *TINY, "--epochs", "1", "--out", out, "--resume", "--set", "optim.momentum=0.5"),
             "optim.momentum: 0.9 saved, 0.5 now")


def test_disk_full_is_one_line_and_keeps_what_was_written(tiny_run, tmp_path, monkeypatch):
    import edlab.files as files

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)  # a finished run of TINY (conftest)
    before = (out / "model.ckpt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    one_line(invoke("train", *TINY, "--epochs", "1", "--out", out, "--resume"), "No space left on device")
    assert (out / "model.ckpt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
