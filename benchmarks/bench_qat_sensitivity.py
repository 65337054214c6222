"""Where a model's k-bit accuracy goes: validation of its calibrated k-bit forms, no training.

Before spending CPU-hours on mixed precision (``edlab quantize --layer-bits``), this says whether the loss of
a uniform k-bit form sits in a few layers (raise those, lower others) or is spread over all of them. It
quantizes a float checkpoint (LSQ layers, the MSE-best steps, activation steps from one batch of 256
training images, as ``edlab quantize --method qat`` starts), then reads the validation split of the
checkpoint's own training (never the test split):

* the float model, the uniform form, weights alone quantized, activations alone quantized;
* for each body layer (first and last excluded: they stay at ``--first-last-bits``), the uniform form with that
  one layer raised to ``--raise-to`` bits (weights and activations), and with its weights alone raised.

A row's gain over the uniform form is what that layer costs. The figures are calibrated forms, lower than the
same forms after QAT fine-tuning; what they rank is the layers.

    python benchmarks/bench_qat_sensitivity.py docs/results/challenge/long-sep233-kd/model.ckpt --first 16
    python benchmarks/bench_qat_sensitivity.py runs/r20/model.ckpt --bits-w 4 --bits-a 4 --json sens.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from edlab.data import get_data, source_split  # noqa: E402
from edlab.device import autocast, resolve_precision, use_threads  # noqa: E402
from edlab.errors import EdlabError  # noqa: E402
from edlab.loader import checkpoint_info, load_checkpoint  # noqa: E402
from edlab.quantize import calibrate, quantize_qat  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a float checkpoint (model.ckpt) whose saved config names its split")
    ap.add_argument("--bits-w", type=int, default=5)
    ap.add_argument("--bits-a", type=int, default=5)
    ap.add_argument("--first-last-bits", type=int, default=8)
    ap.add_argument("--raise-to", type=int, default=8, help="the bits a probed layer is raised to")
    ap.add_argument("--first", type=int, default=None, help="probe only the first N body layers")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    try:
        rows = run(args)
    except EdlabError as e:
        print(f"bench_qat_sensitivity: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def run(args) -> list[dict]:
    use_threads(args.threads)
    device = torch.device("cpu")
    amp = resolve_precision(args.precision, device)
    split = source_split(checkpoint_info(args.checkpoint).get("metadata", {}).get("config") or {})
    if not split["val_size"]:
        raise EdlabError(f"{args.checkpoint} was trained without a validation split: nothing to read but the test")
    common = dict(val_size=split["val_size"], split_seed=split["split_seed"], data_dir=args.data_dir, download=False)
    data = get_data(split["dataset"], **common)
    calib = next(iter(get_data(split["dataset"], augment="none", batch_size=256, **common).train))[0]
    base = load_checkpoint(args.checkpoint).eval()

    @torch.no_grad()
    def val(model: nn.Module) -> float:
        correct = 0
        for x, y in data.val:
            with autocast(device, amp):
                correct += int((model(x).argmax(1) == y).sum())
        return correct / len(data.val.split)

    def form(layer_bits: str | None) -> float:
        model = copy.deepcopy(base)
        quantize_qat(model, args.bits_w, args.bits_a, first_last_bits=args.first_last_bits, layer_bits=layer_bits)
        calibrate(model, calib)
        return val(model.eval())

    bw, ba, up = args.bits_w, args.bits_a, args.raise_to
    ends = f"first={args.first_last_bits},last={args.first_last_bits}"
    rows = [{"form": "float", "val": val(base)}, {"form": f"all {bw}/{ba}", "val": form(None)},
            {"form": f"weights alone at {bw}", "val": form(f"{ends},*={bw}/32")},
            {"form": f"activations alone at {ba} (weights at {up})", "val": form(f"{ends},*={up}/{ba}")}]
    for r in rows:
        print(f"{r['form']:<40} val {100 * r['val']:.2f} %", flush=True)
    uniform = rows[1]["val"]
    names = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:-1]
    print(f"\n{'layer':<28} {f'{up}/{up}':>8} {f'w{up}':>8}   gain over all {bw}/{ba} (points)")
    for name in names[:args.first]:
        t = time.time()
        both, weights = form(f"{name}={up}"), form(f"{name}={up}/{ba}")
        rows.append({"layer": name, "raised": both, "weights_raised": weights})
        print(f"{name:<28} {100 * (both - uniform):>+8.2f} {100 * (weights - uniform):>+8.2f}   "
              f"({time.time() - t:.0f} s)", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
