"""Datasets held as one uint8 tensor on the training device, and a loader that augments whole batches.

Where the data comes from: ``--data-dir``, else ``$EDLAB_DATA_DIR``, else ``./data``, in the standard
python-pickle layouts (``cifar-10-batches-py/``, ``cifar-100-python/``); if absent, torchvision downloads
it. The pickles are read with a restricted unpickler (numpy arrays, lists, dicts, strings only), so a
hostile batch file cannot run code. Official md5 sums are checked but only warned about: local copies
with other bytes (e.g. a JPEG re-encode) are legitimate.

The validation split is carved out of the training set (seeded) and drives every choice during
training; the test split is evaluated once, at the end.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .augment import Augment, alternate_mirror
from .errors import EdlabError
from .files import user_cache

if TYPE_CHECKING:
    from .config import TrainConfig

STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": (["train"], ["test"], "fine_labels"),
}


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 3 x 32 x 32
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> Split:
        return Split(self.images[idx], self.labels[idx])

    def to(self, device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


class _SafeUnpickler(pickle.Unpickler):
    """Only what CIFAR batches contain: numpy array reconstruction. Anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _pixels(raw: np.ndarray) -> np.ndarray:
    """CIFAR pixels as uint8: other integer or float arrays only when every value is a whole number in
    0..255 (a cast would wrap 300.0 to 44 and truncate 0.7 to 0: a dataset that trains without a word)."""
    if raw.dtype == np.uint8:
        return raw
    if raw.dtype.kind not in "iuf":
        raise TypeError(f"pixels must be numbers 0..255, got {raw.dtype}")
    if raw.size and not (np.isfinite(raw).all() and raw.min() >= 0 and raw.max() <= 255
                         and (raw.dtype.kind != "f" or (raw == np.round(raw)).all())):
        raise ValueError(f"pixels must be whole numbers 0..255, got {raw.dtype} values from {raw.min():g} to "
                         f"{raw.max():g}")
    return raw.astype(np.uint8)


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="latin1").load()
        data = _pixels(np.asarray(d["data"])).reshape(-1, 3, 32, 32)
        raw = np.asarray(d[label_key])
        if raw.dtype.kind not in "iu":  # 3.7 must not silently become class 3
            raise TypeError(f"labels must be integers, got {raw.dtype}")
        labels = raw.astype(np.int64)
    except Exception as e:  # any malformed file: one clear line
        raise EdlabError(f"malformed dataset file {path}: {type(e).__name__}: {e}") from None
    if len(data) != len(labels):
        raise EdlabError(f"malformed dataset file {path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def resolve_data_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get("EDLAB_DATA_DIR") or "data").expanduser()


_MD5_CHECKED: set[Path] = set()


def _md5_marker(path: Path) -> Path | None:
    """Where the verdict on this exact file (folder, size, mtime) is remembered across processes, or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    return user_cache("md5-checked", key)


def _check_md5(name: str, folder: Path) -> None:
    """Warn once per data folder when the files are not the official release: the verdict is remembered
    in ~/.cache/edlab/md5-checked/ (keyed by the file's path, size and mtime), so later commands neither
    repeat the warning nor hash the file again; a changed file is checked anew."""
    if folder in _MD5_CHECKED:
        return
    _MD5_CHECKED.add(folder)
    try:
        from torchvision.datasets import CIFAR10, CIFAR100
    except ImportError:
        return
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    fname, md5 = cls.train_list[0]
    path = folder / fname
    marker = _md5_marker(path)
    if marker is None or marker.exists():
        return
    if hashlib.md5(path.read_bytes()).hexdigest() != md5:
        warnings.warn(f"{folder}: files differ from the official release (md5); using them anyway (said once "
                      f"per folder)", stacklevel=3)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{path}\n")
    except OSError:  # a read-only home: the warning comes again next time, nothing worse
        pass


def _download(name: str, root: Path) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    cls(str(root), train=True, download=True)


def load_cifar(name: str, data_dir: str | None = None, download: bool = True) -> tuple[Split, Split]:
    root = resolve_data_dir(data_dir)
    folder = root / FOLDERS[name]
    train_files, test_files, label_key = FILES[name]
    if not folder.is_dir():
        tried = [str(folder)]
        if download:
            try:
                _download(name, root)
            except Exception as e:
                raise EdlabError(
                    f"{name} not found at {folder} and the download failed ({type(e).__name__}); "
                    f"put a copy in that folder, or point --data-dir / EDLAB_DATA_DIR at the folder "
                    f"that holds {FOLDERS[name]}/ (tried: {', '.join(tried)})"
                ) from None
        else:
            raise EdlabError(f"{name} not found at {folder} (set --data-dir or EDLAB_DATA_DIR)")
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise EdlabError(f"dataset folder {folder} is incomplete: missing {', '.join(missing)}")
    _check_md5(name, folder)

    def read(files: list[str]) -> Split:
        parts = [_read_batch(folder / f, label_key) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if y.min() < 0 or y.max() >= NUM_CLASSES[name]:
            raise EdlabError(f"dataset folder {folder}: labels outside 0..{NUM_CLASSES[name] - 1}")
        return Split(torch.from_numpy(x), torch.from_numpy(y))

    return read(train_files), read(test_files)


def synthetic(n_train: int = 2000, n_test: int = 500, num_classes: int = 10, seed: int = 0):
    """A small learnable dataset: each class is a fixed smooth colour pattern plus noise and a shift.

    It trains to high accuracy in a few epochs, which is what fast tests need, and exercises the same
    uint8 path as CIFAR.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(num_classes, 3, 4, 4, generator=g) > 0.5).float()  # distinct binary patterns
    protos = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)

    def make(n: int) -> Split:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.7 * protos[y] + 0.3 * torch.rand(n, 3, 32, 32, generator=g)
        return Split((x * 255).round().clamp(0, 255).to(torch.uint8), y)

    return make(n_train), make(n_test)


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    if val_size >= len(train):
        raise EdlabError(f"val_size {val_size} leaves no training images (the training set has {len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[val_size:]), train.subset(perm[:val_size])


TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "synthetic": 2000}  # before the validation split


def source_split(config: dict) -> dict:
    """The validation split a checkpoint's saved config was trained beside (older configs, without
    ``data.split_seed``, drew it from ``seed``)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    seed = data.get("split_seed")
    return {"dataset": data.get("dataset", "cifar10"), "val_size": data.get("val_size", 5000),
            "split_seed": config.get("seed", 0) if seed is None else seed}


def check_split(source: dict, dataset: str, val_size: int, split_seed: int, teacher: str | None = None) -> int:
    """Warn when a stage validates on another split than its source's (or, given ``teacher``, a checkpoint
    path, than that teacher's): the images of the new validation split that the source was trained on make
    validation (and every choice it drives) optimistic. Returns them."""
    if dataset != source["dataset"] or (val_size, split_seed) == (source["val_size"], source["split_seed"]):
        return 0
    n = TRAIN_IMAGES.get(dataset)
    if n is None:
        return 0
    clip = (lambda v: min(v, n // 5)) if dataset == "synthetic" else (lambda v: v)
    leak = split_leak(n, clip(val_size), split_seed, clip(source["val_size"]), source["split_seed"])
    if leak:
        whose, who, fix = (
            ("the source's", "the source model", "drop the data.split_seed/val_size change") if teacher is None
            else ("the teacher's", f"the teacher {teacher}", "distil from a teacher trained beside the same split"))
        warnings.warn(f"the validation split (val_size {val_size}, split_seed {split_seed}) differs from {whose} "
                      f"(val_size {source['val_size']}, split_seed {source['split_seed']}): {leak:,} of its images "
                      f"were training images of {who}; {fix} to validate on held-out images", stacklevel=2)
    return leak


def split_leak(n_train: int, val_size: int, split_seed: int, source_val_size: int, source_split_seed: int) -> int:
    """How many images of the validation split (val_size, split_seed) were training images of a source model
    trained beside the split (source_val_size, source_split_seed): those validate nothing."""
    if val_size == 0:
        return 0
    new = set(torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))[:val_size].tolist())
    old = torch.randperm(n_train, generator=torch.Generator().manual_seed(source_split_seed))[:source_val_size]
    return len(new - set(old.tolist()))


class Loader:
    """Batches of a device-resident Split, shuffled and augmented per epoch from (seed, epoch).

    Iterating yields (normalised float images, labels). ``set_epoch`` fixes the randomness of the next
    pass, so a resumed run replays exactly the batches of an uninterrupted one.
    """

    def __init__(self, split: Split, batch_size: int, augment: Augment, train: bool = False,
                 seed: int = 0, channels_last: bool = False, drop_last: bool | None = None):
        self.split, self.batch_size, self.augment, self.train = split, batch_size, augment, train
        self.seed, self.channels_last, self.epoch = seed, channels_last, 0
        self.drop_last = train and len(split) >= batch_size if drop_last is None else drop_last
        self.pool: torch.Tensor | None = None  # fixed crop offsets [N, K, 2] (distill.crop_pool), set by fit

    @property
    def device(self) -> torch.device:
        return self.split.images.device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 100003 + self.epoch)

    def __iter__(self):
        gen = self.generator() if self.train else None
        n = len(self.split)
        order = torch.randperm(n, generator=gen, device=self.device) if gen is not None else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            idx = order[sl] if order is not None else sl
            mirror = None
            if gen is not None and self.augment.flip == "alternate":  # step: alternating flip
                mirror = alternate_mirror(idx, n, self.epoch, self.seed)
            shift, self.view = None, None
            if gen is not None and self.pool is not None:  # step: one of each image's pooled crops, at random
                self.view = torch.randint(0, self.pool.shape[1], (len(idx),), generator=gen, device=self.device)
                shift = self.pool[idx, self.view]
            x = self.augment(self.split.images[idx], gen, mirror, shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.index = idx  # which images of the split this batch holds (distillation's logit cache)
            self.mirrored = self.augment.mirrored  # and which of them are mirrored (None: none); self.view:
            # which of its pooled crops each shows (None: no pool)
            yield x, self.split.labels[idx]


@dataclass
class Data:
    train: Loader
    val: Loader | None
    test: Loader
    num_classes: int
    mean: tuple
    std: tuple


def load_splits(dataset: str, data_dir: str | None = None, download: bool = True,
                synthetic_size: tuple[int, int] = (2000, 500)) -> tuple[Split, Split]:
    if dataset == "synthetic":
        return synthetic(*synthetic_size)
    if dataset not in FOLDERS:
        raise EdlabError(f"unknown dataset '{dataset}' (choices: cifar10, cifar100, synthetic)")
    return load_cifar(dataset, data_dir, download)


def get_data(dataset: str = "cifar10", data_dir: str | None = None, batch_size: int = 128,
             augment: str = "crop-flip", val_size: int = 5000, train_subset: int | None = None,
             cutout: int = 0, eval_batch_size: int = 1000, seed: int = 0, device: str | torch.device = "cpu",
             channels_last: bool = False, download: bool = True, split_seed: int | None = None,
             crop_pad: int = 4, crop_fill: str = "zeros", flip: str = "random") -> Data:
    """The train/val/test loaders of a dataset, all resident on ``device``. ``split_seed`` draws the
    validation split (default ``seed``): a stage keeps its source's, so that validation never holds images the
    source model was trained on."""
    train, test = load_splits(dataset, data_dir, download)
    if dataset == "synthetic":
        val_size = min(val_size, len(train) // 5)
    split_seed = seed if split_seed is None else split_seed
    train, val = split_validation(train, val_size, split_seed) if val_size else (train, None)
    if train_subset:
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
                             [:train_subset])
    mean, std = STATS[dataset]
    aug = Augment(augment, mean, std, cutout, crop_pad=crop_pad, crop_fill=crop_fill, flip=flip)
    plain = Augment("none", mean, std)

    def loader(split: Split, bs: int, a: Augment, is_train: bool) -> Loader:
        return Loader(split.to(device), bs, a, train=is_train, seed=seed, channels_last=channels_last)

    return Data(
        train=loader(train, batch_size, aug, True),
        val=loader(val, eval_batch_size, plain, False) if val is not None else None,
        test=loader(test, eval_batch_size, plain, False),
        num_classes=NUM_CLASSES[dataset], mean=mean, std=std,
    )


def data_from_config(cfg: TrainConfig, device: torch.device) -> Data:
    """The data of a run's config (``cfg.data`` and its seed): what every stage trains and evaluates on."""
    d = cfg.data
    return get_data(d.dataset, d.data_dir, d.batch_size, d.augment, d.val_size, d.train_subset, d.cutout,
                    d.eval_batch_size, cfg.seed, device, download=d.download, split_seed=d.split_seed,
                    crop_pad=d.crop_pad, crop_fill=d.crop_fill, flip=d.flip)
