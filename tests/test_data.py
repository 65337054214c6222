import os
import pickle

import numpy as np
import pytest
import torch
from conftest import write_fake_cifar

from edlab import EdlabError
from edlab.augment import (
    Augment,
    affine_grid,
    crop_at,
    crop_pool,
    cutmix,
    cutout,
    mix,
    mixup,
    random_crop,
    random_flip,
    random_scale_rotate,
)
from edlab.data import get_data, load_cifar, split_validation, synthetic


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_synthetic_is_seeded():
    a, _ = synthetic(100, 10, seed=3)
    b, _ = synthetic(100, 10, seed=3)
    assert torch.equal(a.images, b.images) and a.images.dtype == torch.uint8


def test_validation_split_is_disjoint_and_seeded():
    train, _ = synthetic(300, 10)
    train.images[:, 0, 0, 0] = torch.arange(300).to(torch.uint8)  # tag images (mod 256) ...
    train.labels = torch.arange(300)  # ... and labels uniquely
    tr, va = split_validation(train, 50, seed=1)
    assert len(va) == 50 and len(tr) == 250
    assert not set(tr.labels.tolist()) & set(va.labels.tolist())
    assert torch.equal(split_validation(train, 50, seed=1)[1].labels, va.labels)


def test_crop_is_a_shift_of_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop(x, gen(), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_flips_about_half():
    x = torch.randn(400, 3, 4, 4)
    out = random_flip(x, gen())
    flipped = sum(torch.equal(o, xi.flip(2)) for o, xi in zip(out, x))
    assert 140 < flipped < 260


def test_augment_remembers_which_images_it_mirrored():
    """crop-flip with crop_pad 0 shows each image or its mirror, and says which (the teacher cache reads it)."""
    x = torch.randint(0, 255, (64, 3, 6, 6), dtype=torch.uint8)
    aug = Augment("crop-flip", (0.0,) * 3, (1 / 255,) * 3, crop_pad=0)
    out = aug(x, gen())
    m = aug.mirrored
    assert m is not None and 10 < int(m.sum()) < 54
    assert torch.equal(out[m], x[m].flip(3).float()) and torch.equal(out[~m], x[~m].float())
    aug(x, None)
    assert aug.mirrored is None  # evaluation: nothing mirrored


def test_cutout_erases_a_square():
    x = torch.ones(16, 3, 32, 32)
    out = cutout(x, gen(), 8)
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 64 and zeros.min() >= 16  # clipped at borders, never larger


def test_scale_rotate_identity_when_ranges_are_trivial():
    x = torch.randn(4, 3, 32, 32)
    out = random_scale_rotate(x, gen(), scale=(1.0, 1.0), degrees=0.0)
    assert torch.allclose(out, x, atol=1e-5)
    assert not torch.allclose(random_scale_rotate(x, gen()), x, atol=1e-2)


def test_mixup_is_reproducible_and_convex():
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8)
    a = mixup(x, y, 0.4, gen(5))
    b = mixup(x, y, 0.4, gen(5))
    assert a[3] == b[3] and 0 <= a[3] <= 1 and torch.equal(a[0], b[0])


@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_cutmix_label_weight_is_the_exact_pasted_area(alpha):
    """Image i is the constant i, so every pixel says whose it is: in each mixed image the share of pixels
    that are its partner's is 1 - lam, exactly (boxes clipped at the border included), and they are the
    partner's pixels; the label weight is that share, not the drawn Beta value."""
    x, y = torch.arange(16.0).view(16, 1, 1, 1).expand(16, 3, 32, 32).contiguous(), torch.arange(16)
    g, clipped = gen(3), 0
    for _ in range(50):
        mixed, ya, yb, lam = cutmix(x, y, alpha, g)
        assert torch.equal(ya, y)
        for i in range(16):
            if yb[i] == i:
                continue  # its own partner: nothing visible changed
            partner = mixed[i] == yb[i]
            assert torch.equal(partner | (mixed[i] == i), torch.ones_like(partner))  # own or the partner's pixel
            assert float(partner.float().mean()) == pytest.approx(1 - lam, abs=1e-12)
        box = (mixed != x).any(0).any(0)
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        clipped += len(rows) > 0 and (rows.min() == 0 or rows.max() == 31 or cols.min() == 0 or cols.max() == 31)
    assert clipped > 0  # the clipped case was exercised
    a, b = cutmix(x, y, alpha, gen(7)), cutmix(x, y, alpha, gen(7))
    assert torch.equal(a[0], b[0]) and a[3] == b[3]  # reproducible from the generator


def test_mix_chooses_cutmix_with_the_switch_probability_and_keeps_mixup_only_draws():
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8)
    a, b = mix(x, y, 0.4, 0.0, 0.5, gen(5)), mixup(x, y, 0.4, gen(5))  # no switch drawn: old runs replay
    assert torch.equal(a[0], b[0]) and a[3] == b[3]
    assert mix(x, y, 0.0, 0.0, 0.5, gen()) == (x, y, y, 1.0)
    g, cut = gen(1), 0
    for _ in range(400):
        out = mix(x, y, 0.4, 1.0, 0.25, g)
        cut += bool(((out[0] == x) | (out[0] == x[out[2]])).all())  # y = arange: y_b is the partner
    assert 0.2 < cut / 400 < 0.3  # CutMix: every pixel its own or its partner's; mixup blends them


def test_crop_pool_is_fixed_by_the_seed_and_replayed_by_the_augmentation():
    pool = crop_pool(100, 4, 2, seed=3)
    assert pool.shape == (100, 4, 2) and pool.min() == 0 and pool.max() == 4
    assert torch.equal(pool, crop_pool(100, 4, 2, seed=3)) and not torch.equal(pool, crop_pool(100, 4, 2, seed=4))
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    aug = Augment("crop-flip", (0.5,) * 3, (0.25,) * 3, crop_pad=2, crop_fill="reflect")
    mirror = torch.tensor([True, False] * 3)
    out = aug(x, None, mirror, pool[:6, 1])
    want = crop_at(x, pool[:6, 1, 0], pool[:6, 1, 1], 2, "reflect")
    want = torch.where(mirror.view(-1, 1, 1, 1), want.flip(3), want)
    assert torch.equal(out, (want.float() - aug.mean) / aug.std) and torch.equal(aug.mirrored, mirror)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 20.0, 100.0])
def test_mixup_beta_draws_have_the_right_spread_at_every_accepted_alpha(alpha):
    """data.mixup accepts 0-100: Johnk's method alone took ~1e11 tries per draw at 20 (a valid option hung)."""
    import statistics

    from edlab.augment import beta_draw

    g = gen(2)
    draws = [beta_draw(alpha, g, "cpu") for _ in range(1500)]
    assert all(0 <= d <= 1 for d in draws)
    var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a)
    assert abs(statistics.mean(draws) - 0.5) < 0.05 and 0.8 * var < statistics.pvariance(draws) < 1.2 * var


def test_loader_is_deterministic_per_epoch_and_normalised():
    d = get_data("synthetic", batch_size=64, augment="fancy", val_size=100, cutout=4)
    d.train.set_epoch(3)
    first = [x for x, _ in d.train]
    d.train.set_epoch(3)
    again = [x for x, _ in d.train]
    d.train.set_epoch(4)
    other = next(iter(d.train))[0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other)
    assert first[0].dtype == torch.float32 and abs(float(first[0].mean())) < 1.5
    assert sum(len(y) for _, y in d.test) == 500  # eval loaders keep every image


def test_unknown_policy():
    with pytest.raises(ValueError, match="choices"):
        Augment("blur", (0, 0, 0), (1, 1, 1))


def test_cifar_layout_is_read(tmp_path):
    write_fake_cifar(tmp_path)
    train, test = load_cifar("cifar10", str(tmp_path), download=False)
    assert train.images.shape == (100, 3, 32, 32) and len(test) == 20


def test_missing_dataset_names_paths(tmp_path):
    with pytest.raises(EdlabError, match=str(tmp_path / "cifar-10-batches-py")):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_incomplete_or_malformed_folder(tmp_path):
    folder = write_fake_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(EdlabError, match="missing data_batch_3"):
        load_cifar("cifar10", str(tmp_path), download=False)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(EdlabError, match="malformed dataset file"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_bad_labels(tmp_path):
    write_fake_cifar(tmp_path, bad_label=True)
    with pytest.raises(EdlabError, match="labels outside"):
        load_cifar("cifar10", str(tmp_path), download=False)


@pytest.mark.parametrize("pixels,msg", [
    (np.full((20, 3072), 300.0, np.float32), "values from 300 to 300"),  # a uint8 cast wrapped it to 44
    (np.full((20, 3072), -1.0), "values from -1 to -1"),
    (np.full((20, 3072), 0.7, np.float32), "whole numbers"),  # [0, 1] images: the cast made them black
    (np.full((20, 3072), np.nan), "whole numbers"),
    (np.full((20, 3072), 256, np.int64), "values from 256 to 256"),
])
def test_pixels_outside_0_255_are_refused_naming_the_file(tmp_path, pixels, msg):
    folder = write_fake_cifar(tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": pixels, "labels": [0] * 20}, f)
    with pytest.raises(EdlabError, match=f"malformed dataset file {folder / 'data_batch_2'}: .*{msg}"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_whole_pixels_of_any_number_type_load_as_their_uint8(tmp_path):
    folder = write_fake_cifar(tmp_path)
    train, _ = load_cifar("cifar10", str(tmp_path), download=False)
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    for dtype in (np.int64, np.float32):
        with open(folder / "data_batch_1", "wb") as f:
            pickle.dump({**batch, "data": batch["data"].astype(dtype)}, f)
        assert torch.equal(load_cifar("cifar10", str(tmp_path), download=False)[0].images, train.images)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_batch_pickle_does_not_run_code(tmp_path):
    folder = write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": _Evil(str(marker)), "labels": [0]}, f)
    with pytest.raises(EdlabError, match="refused global"):
        load_cifar("cifar10", str(tmp_path), download=False)
    assert not marker.exists()


def test_fancy_folds_crop_and_flip_into_the_warp():
    """With no scale/rotation, the single warp is exactly a padded crop window, flipped or not."""
    x = torch.rand(16, 3, 32, 32) * 255
    out = random_scale_rotate(x, gen(), scale=(1.0, 1.0), degrees=0.0, pad=4, flip=True)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(16):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.allclose(out[i], w, atol=1e-3) for w in windows)
        flipped = any(torch.allclose(out[i], w.flip(2), atol=1e-3) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 2 <= flips <= 14


def test_affine_grid_matches_torch():
    theta = torch.randn(5, 2, 3, generator=gen(2))
    ref = torch.nn.functional.affine_grid(theta, [5, 3, 32, 24], align_corners=False)
    assert torch.allclose(affine_grid(theta, 32, 24), ref, atol=1e-5)


def test_float_labels_are_refused(tmp_path):
    from edlab.data import load_cifar

    write_fake_cifar(tmp_path, n=4, labels=[0.5, 1.7, 2.0, 3.9])
    with pytest.raises(EdlabError, match="labels must be integers"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_md5_warning_once_per_data_folder(tmp_path):
    import warnings

    from edlab import data

    folder = write_fake_cifar(tmp_path, n=4)

    def command() -> int:
        """One command, as a new process would run it: no memo in the process, every warning shown."""
        data._MD5_CHECKED.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data.load_cifar("cifar10", str(tmp_path), download=False)
        return sum("md5" in str(w.message) for w in caught)

    assert [command() for _ in range(3)] == [1, 0, 0]
    os.utime(folder / "data_batch_1", ns=(1, 1))  # the file changed (its mtime): checked anew
    assert command() == 1
