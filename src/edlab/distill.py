"""Knowledge distillation: the loss, the teacher (loaded, checked, its validation leak measured) and the
teacher's logit table, computed once when every epoch shows the same views of each image.

A stage distils by passing ``teacher`` to ``fit``; the stage skeleton (``edlab.stage``) loads it and records
its leak; the loop reads the cached rows (``table_rows``) or calls the teacher on the fly.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .device import autocast
from .errors import EdlabError
from .files import atomic_write_bytes, user_cache
from .loader import load_checkpoint


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, hard: torch.Tensor, t: float,
                 alpha: float) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard, where ``hard`` is
    the label loss (cross-entropy, mixup-weighted when mixing). T^2 keeps the soft term's gradient at the
    scale of the hard one whatever the temperature."""
    soft = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard


def check_teacher(path: str | None) -> None:
    """A teacher file that is not there is refused before any run folder or data is made."""
    if path and not os.path.isfile(path):
        raise EdlabError(f"teacher checkpoint not found: {path}")


def load_teacher(path: str, num_classes: int, data_cfg=None) -> nn.Module:
    """The teacher checkpoint as a float32 eval-mode model, refused in one line when its classes differ.

    With the student's ``data_cfg`` (a DataConfig, split seed written out), a teacher that was trained on
    images of the student's validation split is warned about (``teacher_split_leak``), and the count is kept
    as ``teacher.edlab_val_leak``."""
    teacher = load_checkpoint(path).float().eval().requires_grad_(False)
    out = teacher(torch.zeros(1, 3, 32, 32)).shape[-1]
    if out != num_classes:
        raise EdlabError(f"teacher {path} predicts {out} classes, the data has {num_classes}")
    if data_cfg is not None:
        teacher.edlab_val_leak = teacher_split_leak(teacher, path, data_cfg)
    return teacher


def teacher_split_leak(teacher: nn.Module, path: str, data_cfg) -> int | None:
    """How many of the student's validation images the teacher trained on (warned about), None when its
    checkpoint does not say how it was trained. Such a teacher carries what it learnt of those images into
    the student through its logits on their training neighbours, so the student's validation accuracy reads
    high and every choice made on it is biased. Measured once (CIFAR-10 JPEG copy): a depthwise student
    distilled from an airbench94 teacher trained on all 50,000 images read 1.46 points higher on validation
    than on test; trained alone, 0.43."""
    from .data import check_split, source_split

    config = (getattr(teacher, "edlab_metadata", None) or {}).get("config")
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict) or data_cfg.split_seed is None:
        return None
    return check_split(source_split(config), data_cfg.dataset, data_cfg.val_size, data_cfg.split_seed,
                       teacher=path)


def leak_record(teacher: nn.Module | None, path: str | None, upstream: int) -> dict:
    """What a stage's summary says of its teacher: the checkpoint, how many validation images it trained on
    (None: its checkpoint does not say) and ``val_leak``, the most images any teacher, this stage's or an
    earlier stage's, trained on (``edlab report`` marks the val of such a run)."""
    own = getattr(teacher, "edlab_val_leak", None) if teacher is not None else None
    out = {"teacher": path, "teacher_val_leak": own} if teacher is not None else {}
    return {**out, "val_leak": max(upstream, own or 0)}


def cached_views(loader) -> int:
    """How many fixed views of each training image the batches can show: 1 when they are the images as
    stored (augment none), 2 when the only augmentation is a mirror (crop-flip with crop_pad 0), 0 when they
    vary more (crops, warps, cutout). With 1 or 2 the teacher's logits depend on (image, mirrored) alone and
    are computed once (``teacher_table``) instead of on every step."""
    aug = loader.augment
    if getattr(aug, "cutout", 0):
        return 0
    policy = getattr(aug, "policy", None)
    if policy == "none":
        return 1
    return 2 if policy == "crop-flip" and getattr(aug, "crop_pad", None) == 0 else 0


@torch.no_grad()
def teacher_table(teacher: nn.Module, loader, amp: torch.dtype | None, views: int = 1, batch: int = 1000,
                  pool: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's logits of every training image, one row per image of the split (views 1), or of every
    image and its mirror ([N, 2, classes], views 2): a step then reads its rows by (index, mirrored). With a
    crop ``pool`` ([N, K, 2] offsets): of each pooled crop and its mirror, [N, K, 2, classes], made by the
    loader's own augmentation (the exact tensors a step shows the student), read by (index, view, mirrored)."""
    images = loader.split.images
    rows = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        with autocast(loader.device, amp):
            if pool is not None:
                views_of = [teacher(loader.augment(chunk, None, torch.full((len(chunk),), m, device=chunk.device),
                                                   pool[i:i + batch, k])).float()
                            for k in range(pool.shape[1]) for m in (False, True)]
                rows.append(torch.stack(views_of, 1).unflatten(1, (pool.shape[1], 2)))
                continue
            x = loader.augment(chunk, None)  # normalised, unaugmented (mirroring commutes with it)
            out = teacher(x).float()
            rows.append(out if views == 1 else torch.stack([out, teacher(x.flip(3)).float()], 1))
    return torch.cat(rows) if rows else torch.zeros(0, 0, device=loader.device)


TABLE_FILE = "teacher-table.pt"  # the run's cached teacher logits while it trains: a resume reads them back


def _table_key(teacher: nn.Module, loader, amp: torch.dtype | None, views: int, batch: int = 1000,
               pool: torch.Tensor | None = None) -> str:
    """sha256 of what the table depends on: the teacher's weights and buffers, the teacher's exact inputs
    (the split's images, normalised, and with a crop pool its offsets, padding and fill) and the views and
    precision. Hashing ~0.5 GB takes about a second; the table it saves took minutes. Without a pool the key
    is what it was before pools existed (a table saved then is still read back)."""
    head = f"edlab-teacher-table/1 views={views} amp={amp}"
    if pool is not None:
        head += f" pool={tuple(pool.shape)} pad={loader.augment.crop_pad} fill={loader.augment.crop_fill}"
    h = hashlib.sha256(head.encode())
    if pool is not None:
        h.update(pool.cpu().contiguous().numpy().tobytes())
    for k, v in teacher.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    images = loader.split.images
    h.update(str(tuple(images.shape)).encode())
    for i in range(0, len(images), batch):
        h.update(loader.augment(images[i:i + batch], None).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


SHARED_TABLES = 8  # finished tables kept in the shared cache, the newest (14-29 MB each for a CIFAR-10 crop pool)


def shared_table_dir() -> Path | None:
    """Where teacher tables are kept for any later run with the same key: another run of the same teacher
    over the same split and views (a study's trials, a QAT stage after the long run that built the table),
    which then skips the teacher's pass (15-25 CPU-minutes for airbench94 over a crop pool on this project's
    2-core host). ``$EDLAB_TEACHER_CACHE`` (``off``: no sharing), else ``$XDG_CACHE_HOME/edlab/teacher-tables``
    (``~/.cache`` by default); delete it at will."""
    given = os.environ.get("EDLAB_TEACHER_CACHE")
    if given is not None:
        return None if given.strip().lower() in ("", "off", "0", "no", "false") else Path(given).expanduser()
    return user_cache("teacher-tables")


def _read_table(path: Path, key: str) -> torch.Tensor | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: the caller recomputes (and replaces) it
        return None
    if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("table"), torch.Tensor):
        return saved["table"]
    return None


def _keep_newest(folder: Path, n: int) -> None:
    tables = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in tables[n:]:
        old.unlink(missing_ok=True)


def saved_teacher_table(teacher: nn.Module, loader, amp: torch.dtype | None, views: int, path=None,
                        write: bool = True, pool: torch.Tensor | None = None,
                        shared: Path | None = None) -> tuple[torch.Tensor, Path | None]:
    """``teacher_table``, kept in ``path`` so that a resumed run (``--resume`` after a kill, the next
    session's continuation) reads it back instead of paying the teacher's pass again (4-5 minutes for
    airbench94 on 45,000 images and their mirrors on 2 CPU cores), and in the folder ``shared``
    (:func:`shared_table_dir`) for other runs with the same key. A file is used only when its key matches this
    teacher and these inputs; an unreadable or stale one is recomputed and replaced. Returns (table, the file
    it was read from, None when computed). ``pool``: a crop pool's offsets (``teacher_table``), part of the
    key. ``write``: False on the processes of a distributed run that are not the main one."""
    key = _table_key(teacher, loader, amp, views, pool=pool) if path is not None or shared is not None else None
    common = shared / f"{key}.pt" if shared is not None else None
    for source in (path, common):
        if source is not None and Path(source).exists():
            table = _read_table(Path(source), key)
            if table is not None:
                if source is common and path is not None and write:  # the run's own copy, for its resume
                    atomic_write_bytes(path, Path(common).read_bytes())
                if source is path and common is not None and write and not common.exists():
                    # a run resumed from its own copy (made elsewhere, or before the cache) seeds the cache,
                    # so the stage after it (a QAT of the same teacher) skips the teacher's pass
                    _share(Path(path).read_bytes(), common)
                return table.to(loader.device), Path(source)
    table = teacher_table(teacher, loader, amp, views, pool=pool)
    if write and (path is not None or common is not None):
        buf = io.BytesIO()
        torch.save({"key": key, "table": table.cpu()}, buf)
        if path is not None:
            atomic_write_bytes(path, buf.getvalue())
        if common is not None:
            _share(buf.getvalue(), common)
    return table, None


def _share(data: bytes, common: Path) -> None:
    """Put a table in the shared cache; a cache: a read-only or full disk there must not stop the run."""
    try:
        atomic_write_bytes(common, data)
        _keep_newest(common.parent, SHARED_TABLES)
    except OSError:
        pass


def table_rows(table: torch.Tensor, loader) -> torch.Tensor:
    """The cached teacher logits of the loader's last batch."""
    if table.dim() == 2:
        return table[loader.index]
    if table.dim() == 4:  # a crop pool: the pooled crop and mirror each image of the batch shows
        return table[loader.index, loader.view, loader.mirrored.long()]
    return table[loader.index, loader.mirrored.long()]  # image and mirror: the view the batch shows

