"""airbench94's tricks as edlab options (issue 13): each one checked on tiny synthetic inputs."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import kill_after_epoch

from edlab import EdlabError
from edlab.augment import Augment, alternate_mirror
from edlab.config import OptimConfig, SchedConfig
from edlab.data import Loader, Split, data_from_config
from edlab.models import create_model
from edlab.optim import LRSchedule, build_optimizer, total_steps
from edlab.resume import read_resume
from edlab.train import fit, model_from_config, train
from edlab.tricks import Lookahead, dirac_init, patch_whitening, whiten_first_conv

AIRBENCH = {"model.name": "airbench94", "model.width": 0.25, "model.bn_momentum": 0.4, "data.crop_pad": 2,
            "data.crop_fill": "reflect", "data.flip": "alternate", "optim.freeze_bn_weight": True,
            "optim.bn_bias_lr_scale": 64, "optim.lr": 0.2, "optim.no_decay_bn_bias": False,
            "sched.name": "linear", "init.whiten": True, "init.whiten_bias_epochs": 1, "init.whiten_samples": 64,
            "init.dirac": True, "lookahead": 5, "label_smoothing": 0.2, "data.batch_size": 64, "data.val_size": 64,
            "data.train_subset": 256}


def test_whitening_filters_are_orthogonal_eigenvectors_of_the_patch_covariance():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)  # correlated channels
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 8, 8, generator=g))
    w = patch_whitening(x, 2, 2, eps=0.0).double()
    assert w.shape == (12, 3, 2, 2)
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    cov = patches.T @ patches / len(patches)
    flat = w.reshape(12, 12)
    # whitening: the filtered patches have identity covariance; the filters are orthogonal directions
    assert torch.allclose(flat @ cov @ flat.T, torch.eye(12, dtype=torch.float64), atol=1e-6)
    gram = flat @ flat.T
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-5 * gram.abs().max())
    variances = (flat @ cov @ flat.T).diagonal() / gram.diagonal()  # largest-variance direction first
    assert all(a >= b - 1e-9 for a, b in zip(variances, variances[1:]))


def test_whitening_stem_is_plus_minus_filters_frozen_and_refused_where_it_does_not_fit():
    model = create_model("airbench94", width=0.25)
    x = torch.randn(16, 3, 32, 32)
    conv = whiten_first_conv(model, x)
    assert conv is model.stem and not conv.weight.requires_grad and torch.equal(conv.bias, torch.zeros(24))
    assert torch.allclose(conv.weight[:12], -conv.weight[12:])
    with pytest.raises(EdlabError, match="init.whiten"):  # resnet20's stem: 3x3x3 patches, 16 channels fit
        whiten_first_conv(create_model("resnet20", width=4.0), x)  # 64 channels > 2 x 27: refused
    whiten_first_conv(create_model("resnet20"), x)


def test_dirac_init_makes_a_conv_an_identity():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, groups=4,
                                                                                 bias=False))
    stem = model[0].weight.detach().clone()
    assert dirac_init(model) == 3
    assert torch.equal(model[0].weight, stem)  # the image-reading conv is left alone
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(model[1](x), x)
    y = model[2](x)
    assert torch.equal(y[:, :8], x) and not torch.equal(y[:, 8:], torch.zeros_like(y[:, 8:]))
    x16 = torch.randn(2, 16, 6, 6)
    assert torch.equal(model[3](x16), x16)


def test_alternating_flip_mirrors_exactly_the_images_not_mirrored_the_epoch_before():
    n = 50
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    split = Split(images, torch.arange(n))  # label = the image's index
    aug = Augment("crop-flip", (0.5,) * 3, (0.25,) * 3, crop_pad=0, flip="alternate")
    loader = Loader(split, 16, aug, train=True, seed=3, drop_last=False)
    plain = (images.float() - 127.5) / 63.75

    def mirrored(epoch):
        loader.set_epoch(epoch)
        out = {}
        for x, y in loader:
            for img, i in zip(x, y.tolist()):
                assert torch.allclose(img, plain[i]) or torch.allclose(img, plain[i].flip(2))
                out[i] = torch.allclose(img, plain[i].flip(2))
        return torch.tensor([out[i] for i in range(n)])

    m0, m1, m2 = mirrored(0), mirrored(1), mirrored(2)
    assert torch.equal(m1, ~m0) and torch.equal(m2, m0) and 10 < int(m0.sum()) < 40
    assert torch.equal(alternate_mirror(torch.arange(n), n, 5, 3), m1)


def test_reflect_translation_shifts_by_at_most_the_pad_over_a_reflected_border():
    x = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(200, 3, 1, 1)
    aug = Augment("crop-flip", (0.0,) * 3, (1 / 255,) * 3, crop_pad=2, crop_fill="reflect", flip="alternate")
    out = aug(x, torch.Generator().manual_seed(0), torch.zeros(200, dtype=torch.bool)).round().to(torch.uint8)
    padded = F.pad(x[:1].float(), (2, 2, 2, 2), mode="reflect")[0, 0]
    windows = {(dy, dx): padded[dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)}
    seen = set()
    for img in out[:, 0].float():
        match = [k for k, w in windows.items() if torch.equal(w, img)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 25  # every shift in [-2, 2]^2 drawn; no zero fill anywhere
    assert int(out.min()) >= 0 and not (out == 0).all(dim=(1, 2, 3)).any()


def test_lookahead_resets_the_network_to_the_average():
    model = nn.Linear(2, 1, bias=False)
    look = Lookahead(model, every=2, decay=0.5, total_steps=4)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    look.step(1)  # not a multiple of every: nothing happens
    assert torch.equal(model.weight, start + 1)
    look.step(2)  # decay 0.5^2 x (2/4)^3 = 1/32: the average moves 31/32 of the way; the network is reset to it
    assert torch.allclose(model.weight, start + 31 / 32) and torch.allclose(look.avg["weight"], start + 31 / 32)
    with torch.no_grad():
        model.weight.add_(1.0)
    look.step(4)  # decay 0.25: the average moves 3/4 of the way
    assert torch.allclose(model.weight, start + 31 / 32 + 0.75)
    with torch.no_grad():
        model.weight.add_(5.0)
    look.finish()  # the end: the network is the average
    assert torch.allclose(model.weight, start + 31 / 32 + 0.75)


def test_bn_bias_group_has_the_scaled_lr_and_the_same_decay_per_step_and_frozen_bn_weights():
    model = create_model("airbench94", width=0.25)
    cfg = OptimConfig(lr=1.5, weight_decay=1e-3, no_decay_bn_bias=False, freeze_bn_weight=True, bn_bias_lr_scale=64)
    opt = build_optimizer(model, cfg)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.weight.requires_grad for m in bn)
    group = next(g for g in opt.param_groups if g.get("lr_scale") == 64)
    assert {id(p) for p in group["params"]} == {id(m.bias) for m in bn}
    assert group["weight_decay"] * 64 == pytest.approx(1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_linear_schedule_and_fractional_epoch_step_counts():
    assert total_steps(9.9, 48) == 476 and total_steps(3, 10) == 30 and total_steps(2.5, 7) == 18
    s = LRSchedule(SchedConfig(name="linear", pct_start=0.23), epochs=9.9, steps_per_epoch=48)
    rise = int(0.23 * 476)
    assert s.factor(0) == pytest.approx(0.2) and s.factor(rise) == pytest.approx(1.0)
    assert s.factor(476) == pytest.approx(0.07) and s.factor(rise // 2) == pytest.approx(0.6, abs=0.01)


def test_airbench_views_are_flip_shift_views_with_airbench_weights():
    from edlab.views import shift, tta_logits

    x = torch.randn(2, 3, 8, 8)

    class Corner(nn.Module):  # neither flip- nor shift-invariant
        def forward(self, x):
            return x[..., :3, :2].mean((1, 2, 3))[:, None].repeat(1, 2)

    m = Corner()
    views = [x, x.flip(3), shift(x, 1, 1), shift(x, 1, 1).flip(3), shift(x, -1, -1), shift(x, -1, -1).flip(3)]
    want = sum(w * m(v) for w, v in zip([1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 8], views))
    assert torch.allclose(tta_logits(m, x, "airbench"), want)
    assert torch.allclose(tta_logits(m, x, "flip-shift"), sum(m(v) for v in views) / 6)


def test_fractional_epochs_run_the_right_number_of_steps_and_every_trick_trains(tiny_cfg):
    cfg = tiny_cfg(epochs=2.5, **AIRBENCH)  # 256 images / batch 64 = 4 steps an epoch -> 10 steps
    data = data_from_config(cfg, torch.device("cpu"))
    model = model_from_config(cfg, data.num_classes)
    from edlab.train import init_model

    init_model(model, cfg, data)
    stem = model.stem.weight.detach().clone()
    calls = []
    real_step = Lookahead.step
    Lookahead.step = lambda self, done: (calls.append(done), real_step(self, done))[1]
    try:
        state = fit(model, data, cfg)
    finally:
        Lookahead.step = real_step
    assert len(data.train) == 4 and calls == list(range(1, 11)) and state.epoch == 3
    assert torch.equal(model.stem.weight, stem)  # frozen whitening weights
    assert not model.stem.bias.requires_grad  # its bias froze after init.whiten_bias_epochs = 1
    assert all(math.isfinite(r["train_loss"]) for r in state.history)


def test_resume_with_every_trick_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    full = tiny_cfg(epochs=2.5, out=str(tmp_path / "full"), **AIRBENCH)
    m_full, s_full = train(full)
    cut = tiny_cfg(epochs=2.5, out=str(tmp_path / "cut"), **AIRBENCH)
    from edlab.train import init_model

    run = kill_after_epoch(cut, 2, lambda c, d: init_model(model_from_config(c, d.num_classes), c, d))
    blob = read_resume(run.file("resume.pt"))  # checksummed resume file (part 11)
    assert blob["lookahead"] is not None
    m_res, s_res = train(cut, resume=True)
    assert s_res["test_accuracy"] == s_full["test_accuracy"]
    for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values()):
        assert torch.equal(a, b)
