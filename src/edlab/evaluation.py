"""Evaluation: accuracy and loss over a loader, the stage's one reading of the test split, and ``edlab eval``.

The validation split is read every epoch (``evaluate``); the test split once per stage (``final_test``), so
that no choice is made on it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DATASETS, TrainConfig
from .data import get_data
from .device import autocast, resolve_device
from .errors import EdlabError
from .views import TTA_VIEWS, tta_logits

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # inference["precision"] of an autocast test
AUTOCAST_AS = ("trained", "fp32")  # what `edlab eval --autocast` evaluates in


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: torch.dtype | None = None, tta: str = "none") -> dict:
    """Mean cross-entropy and accuracy over a loader (sums kept on device: one sync at the end)."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    first = next(model.parameters(), None)  # a half model (edlab eval --half) takes half inputs
    dtype = first.dtype if first is not None else torch.float32  # no parameters: an ONNX Runtime model
    for x, y in loader:
        x = x.to(dtype)
        with autocast(device, amp):
            out = tta_logits(model, x, tta)
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    model.train(was_training)
    return {"loss": float(loss_sum) / max(1, n), "accuracy": float(correct) / max(1, n)}


def final_test(model: nn.Module, data, amp: torch.dtype | None, cfg: TrainConfig) -> dict:
    """The stage's one reading of the test split, or None figures when ``cfg.final_test`` is off (a study that
    tests only its chosen points: the others' test accuracy is never seen)."""
    if not cfg.final_test:
        return {"accuracy": None, "loss": None}
    return evaluate(model, data.test, amp, cfg.tta)


def pct(v: float | None) -> str:
    """An accuracy as '91.25%', or 'untested' (final_test off)."""
    return "untested" if v is None else f"{100 * v:.2f}%"


def evaluate_checkpoint(checkpoint: str, dataset: str | None = None, data_dir: str | None = None,
                        half: bool = False, batch_size: int = 1000, device: str = "auto", tta: str = "trained",
                        progress=None, autocast_as: str = "trained", threads: int | None = None) -> dict:
    """``edlab eval`` as a call: re-measure the test accuracy of a checkpoint, packed or .onnx file (or run
    folder) on the dataset it was trained on, with the views it was measured with (``tta="trained"``) and
    the arithmetic: ``autocast_as="trained"`` runs the model under the autocast dtype its stage tested in
    (bf16 on a CPU with fast bf16, say), so that the accuracy printed beside its score is reproduced, not
    a neighbour of it; ``"fp32"`` evaluates in float32. Returns {checkpoint, dataset, precision, tta, views,
    test_accuracy, test_loss, images}. ``progress(text)``, if given, hears what is about to be evaluated.
    ``threads``: torch's CPU threads (``use_threads``), e.g. 1 beside a training on a shared machine."""
    from .checkpoint import trained_with
    from .device import use_threads
    from .loader import load_checkpoint, load_model, resolve_model_path

    if dataset is not None and dataset not in DATASETS:
        raise EdlabError(f"unknown dataset '{dataset}' (choices: {', '.join(DATASETS)})")
    if tta != "trained" and tta not in TTA_VIEWS:
        raise EdlabError(f"unknown tta '{tta}' (choices: {', '.join(TTA_VIEWS)}, trained)")
    if autocast_as not in AUTOCAST_AS:
        raise EdlabError(f"unknown autocast '{autocast_as}' (choices: {', '.join(AUTOCAST_AS)})")
    if threads is not None and threads < 1:
        raise EdlabError(f"threads must be >= 1, got {threads}")
    use_threads(threads)
    checkpoint = resolve_model_path(checkpoint)
    onnx = checkpoint.endswith(".onnx")
    model = load_model(checkpoint) if onnx else load_checkpoint(checkpoint)
    meta = model.edlab_metadata if isinstance(getattr(model, "edlab_metadata", None), dict) else {}
    trained = trained_with(model)  # checked metadata: never a folder to create or a download to try
    recorded = meta.get("dataset") if meta.get("dataset") in DATASETS else None
    dataset = dataset or recorded or trained["dataset"] or "cifar10"
    dev = resolve_device("cpu" if onnx else device)  # ONNX Runtime runs here on the CPU
    if onnx and half:
        raise EdlabError("--half applies to checkpoints; an ONNX file runs in the precision it was exported in")
    data = get_data(dataset, data_dir or trained["data_dir"], batch_size=batch_size, val_size=0,
                    eval_batch_size=batch_size, device=dev, download=False)
    model.to(dev)
    precision, amp = "fp32", None
    inference = meta.get("inference") if isinstance(meta.get("inference"), dict) else {}
    if half:
        dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
        model.to(dtype)
        precision = str(dtype).replace("torch.", "")
    elif autocast_as == "trained" and not onnx and inference.get("precision") in AUTOCAST:
        amp = AUTOCAST[inference["precision"]]  # a float model tested under autocast: the same arithmetic
        precision = f"{inference['precision']} autocast, as its stage tested"
    if tta == "trained":
        tta = inference.get("tta") if inference.get("tta") in TTA_VIEWS else trained["tta"]
    if progress is not None:
        progress(f"evaluating {len(data.test.split):,} test images x {TTA_VIEWS[tta]} view(s) on {dev}")
    r = evaluate(model, data.test, amp, tta=tta)
    if onnx:
        precision = (model.edlab_metadata.get("inference") or {}).get("precision", "fp32") + " (ONNX Runtime)"
    return {"checkpoint": checkpoint, "dataset": dataset, "precision": precision, "tta": tta,
            "views": TTA_VIEWS[tta],
            "test_accuracy": r["accuracy"], "test_loss": r["loss"], "images": len(data.test.split)}
