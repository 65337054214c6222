"""int8 inference with ONNX Runtime vs fp32 (PyTorch and ONNX Runtime), and what the runtime needs to be fast.

Why: post-training int8 is only worth shipping if it is faster on the CPU at hand and costs (almost) no
accuracy. Each row is one way of producing and running the int8 graph of the same checkpoint, all measured in
one process on the same input batch with the same thread count, so the ratios hold on a busy machine:

* ``ort-default``: ``quantize_static``'s defaults (QDQ, int8 activations, per-tensor weights);
* ``qdq-u8s8``, ``qoperator-u8s8`` (edlab's default), with per-channel weights: uint8 activations, int8
  weights, the operand types of the VNNI instruction (``vpdpbusd``) that ORT's MLAS kernels use;
* ablations of the default: graph optimisation level EXTENDED (no NHWC transformer), per-tensor weights,
  ``reduce_range`` (7-bit weights, meant for CPUs without VNNI).

Latency is the median of ``--reps`` runs of one batch after warm-up. Accuracy (``--data-dir`` with CIFAR-10)
is measured on the whole test split with ONNX Runtime; calibration reads ``--calib-images`` training images.

    python benchmarks/bench_int8.py --checkpoint runs/r20/model.ckpt --data-dir /root/.cache/cifar10
        [--batch 64] [--threads 1] [--reps 30] [--calib-images 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from edlab.checkpoint import load_checkpoint
from edlab.data import get_data
from edlab.device import host
from edlab.errors import EdlabError
from edlab.export import export_onnx, latency_ms, ort_evaluate, ort_session, plain_batches
from edlab.models import create_model

# name: (quant_format, activations, per_channel, reduce_range, optimisation level)
VARIANTS = {
    "ort-default": ("qdq", "int8", False, False, "all"),
    "qdq-u8s8": ("qdq", "uint8", True, False, "all"),
    "qoperator-u8s8": ("qoperator", "uint8", True, False, "all"),
    "qoperator-u8s8-extended": ("qoperator", "uint8", True, False, "extended"),
    "qoperator-u8s8-per-tensor": ("qoperator", "uint8", False, False, "all"),
    "qoperator-u8s8-reduce-range": ("qoperator", "uint8", True, True, "all"),
}


def machine() -> str:
    import onnxruntime

    h = host()
    vnni = " ".join(f for f in h["flags"] if "vnni" in f or "bf16" in f or "amx" in f)
    return (f"{h['cpu']} ({h['cores']} cores; {vnni or 'no VNNI/AMX'}), torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="edlab checkpoint (default: an untrained resnet20: latency only)")
    ap.add_argument("--data-dir", default=os.environ.get("EDLAB_DATA_DIR"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--no-accuracy", action="store_true", help="latency only")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint) if args.checkpoint else create_model("resnet20").eval()
    try:
        data = get_data("cifar10", args.data_dir, batch_size=256, augment="none", val_size=0,
                        eval_batch_size=500, download=False)
        dataset = "CIFAR-10 at " + str(args.data_dir)
    except EdlabError as e:
        print(f"CIFAR-10 unavailable ({e}); calibrating and evaluating on the synthetic set", file=sys.stderr)
        data = get_data("synthetic", val_size=0, eval_batch_size=500)
        dataset = "synthetic"
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx")
        with torch.inference_mode():
            torch_ms = latency_ms(lambda: model(x), args.reps)
            torch_acc = None if args.no_accuracy else sum(int((model(a).argmax(1) == b).sum()) for a, b in data.test)
        rows.append({"variant": "pytorch-fp32", "ms": torch_ms,
                     "accuracy": None if torch_acc is None else torch_acc / len(data.test.split)})
        s32 = ort_session(fp32, args.threads)
        rows.append({"variant": "ort-fp32", "ms": latency_ms(lambda: s32.run(None, {"input": xn}), args.reps),
                     "accuracy": None if args.no_accuracy else ort_evaluate(s32, data.test)["accuracy"]})
        for name in args.variants.split(","):
            fmt, act, per_channel, reduce_range, level = VARIANTS[name]
            path = export_onnx(model, Path(tmp) / f"{name}.onnx", int8=True,
                               calib_loader=plain_batches(data, args.calib_images), calib_images=args.calib_images,
                               quant_format=fmt, per_channel=per_channel, reduce_range=reduce_range, activations=act)
            s8 = ort_session(path, args.threads, level=level)
            rows.append({"variant": name, "ms": latency_ms(lambda s8=s8: s8.run(None, {"input": xn}), args.reps),
                         "accuracy": None if args.no_accuracy else ort_evaluate(s8, data.test)["accuracy"],
                         "format": fmt, "activations": act, "per_channel": per_channel,
                         "reduce_range": reduce_range, "level": level})
    ort_ms = rows[1]["ms"]
    print(f"\nint8 vs fp32, batch {args.batch}, {args.threads} thread(s), median of {args.reps}; {machine()}; "
          f"data: {dataset}; checkpoint: {args.checkpoint or 'untrained resnet20'}; "
          f"{(time.time() - t0) / 60:.1f} min\n")
    print("| variant | ms / batch | vs PyTorch fp32 | vs ORT fp32 | test accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        print(f"| {r['variant']} | {r['ms']:.1f} | {torch_ms / r['ms']:.2f}x | {ort_ms / r['ms']:.2f}x | {acc} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "batch": args.batch, "threads": args.threads,
                                               "reps": args.reps, "dataset": dataset,
                                               "checkpoint": args.checkpoint, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
