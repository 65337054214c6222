"""Time per epoch of a distilled student: the teacher's logits cached for a crop pool (distill.crop_pool K)
against the teacher run on every crop-flip batch (issue 26).

One thread; the two modes alternate (fly, pool, fly, pool, ...) so that a busy machine slows both alike. Per
training epoch it reports wall seconds and CPU seconds of this process (validation excluded: the same for
both), and for the pool the one-off teacher pass over the N x K x 2 pooled views. CPU seconds are the
steadier figure on a shared machine (wall time there includes waiting for a core).

    python benchmarks/bench_crop_pool.py --teacher runs/t/model.ckpt --data-dir .cache/cifar10 \\
        --train-subset 2000 --pool 8 --epochs 2 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import edlab.data
import edlab.distill as D
import edlab.train as T
from edlab.config import load_train_config


def one_run(args, pool: int) -> dict:
    sets = [f"data.train_subset={args.train_subset}", f"epochs={args.epochs}", "threads=1", "final_test=false",
            f"distill.teacher={args.teacher}", f"distill.crop_pool={pool}"]
    if args.data_dir:
        sets.append(f"data.data_dir={args.data_dir}")
    cfg = load_train_config(args.config, None, sets)
    data = edlab.data.data_from_config(cfg, torch.device("cpu"))
    model = T.model_from_config(cfg, data.num_classes)
    teacher = D.load_teacher(cfg.distill.teacher, data.num_classes)
    spent = {"eval_cpu": [], "eval_wall": [], "table_cpu": 0.0, "table_wall": 0.0}
    real_eval, real_table = T.evaluate, D.teacher_table

    def timed(fn, cpu_key, wall_key, append):
        def inner(*a, **k):
            c, w = time.process_time(), time.perf_counter()
            out = fn(*a, **k)
            dc, dw = time.process_time() - c, time.perf_counter() - w
            if append:
                spent[cpu_key].append(dc)
                spent[wall_key].append(dw)
            else:
                spent[cpu_key], spent[wall_key] = dc, dw
            return out
        return inner

    marks = [(time.process_time(), time.perf_counter())]
    T.evaluate = timed(real_eval, "eval_cpu", "eval_wall", True)
    D.teacher_table = timed(real_table, "table_cpu", "table_wall", False)
    try:
        T.fit(model, data, cfg, teacher=teacher,
              on_epoch=lambda row: marks.append((time.process_time(), time.perf_counter())))
    finally:
        T.evaluate, D.teacher_table = real_eval, real_table
    cpu = [b[0] - a[0] - e for a, b, e in zip(marks, marks[1:], spent["eval_cpu"])]
    wall = [b[1] - a[1] - e for a, b, e in zip(marks, marks[1:], spent["eval_wall"])]
    cpu[0] -= spent["table_cpu"]  # the first epoch's mark includes the table
    wall[0] -= spent["table_wall"]
    return {"cpu": cpu, "wall": wall, "table_cpu": spent["table_cpu"], "table_wall": spent["table_wall"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--config", default="configs/student-dw233-distill.yaml")
    p.add_argument("--data-dir")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--pool", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {"fly": [], "pool": []}
    for _ in range(args.repeats):
        runs["fly"].append(one_run(args, 0))
        runs["pool"].append(one_run(args, args.pool))
    print(f"{args.train_subset} images, {args.epochs} epochs x {args.repeats} runs per mode, 1 thread")
    print("| mode | CPU s / epoch (median) | wall s / epoch (median) | one-off teacher pass, CPU s (wall s) |")
    print("| --- | --- | --- | --- |")
    for mode, rs in runs.items():
        cpu = statistics.median(c for r in rs for c in r["cpu"])
        wall = statistics.median(w for r in rs for w in r["wall"])
        table = f"{statistics.median(r['table_cpu'] for r in rs):.1f} " \
                f"({statistics.median(r['table_wall'] for r in rs):.1f})" if mode == "pool" else "-"
        name = "teacher on the fly" if mode == "fly" else f"crop pool K = {args.pool}"
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {table} |")
    print("per-epoch CPU s:", {m: [[round(c, 2) for c in r["cpu"]] for r in rs] for m, rs in runs.items()})


if __name__ == "__main__":
    main()
