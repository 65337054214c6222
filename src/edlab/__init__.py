"""edlab: efficient deep learning on CIFAR — train, compress, score and compare ResNets.

The public Python API: one function per ``edlab`` command, plus the building blocks they are made of
(docs/api.md). Names load on first use, so ``import edlab`` stays light (no torch until a function needs it,
never click or rich: the command line lives in edlab.cli, which the library does not import).
"""

from __future__ import annotations

import importlib

from .errors import EdlabError

# public name -> "module:attribute" (grouped by the command each one serves). No name is also a submodule's
# (edlab.train, edlab.pack, edlab.lr_find stay modules: the functions are train_model, pack_checkpoint,
# find_lr); ``score`` is the course formula, edlab.scoring:score (the counting module is edlab.scoring).
_API = {
    # models, configs, data, checkpoints
    "create_model": "models:create_model", "list_models": "models:list_models",
    "register_model": "models:register_model", "model_sizes": "models:model_sizes",  # edlab models
    "TrainConfig": "config:TrainConfig", "load_train_config": "config:load_train_config", "get_data": "data:get_data",
    "load_checkpoint": "loader:load_checkpoint", "save_checkpoint": "checkpoint:save_checkpoint",
    "load_model": "loader:load_model",
    # edlab train, eval, lr-find
    "train_run": "train:train_run", "train_model": "train:train", "fit": "train:fit", "evaluate": "evaluation:evaluate",
    "evaluate_checkpoint": "evaluation:evaluate_checkpoint", "find_lr": "lr_find:find_lr",
    # edlab score, info
    "profile": "scoring:profile", "score": "scoring:score", "score_file": "inspect_file:score_file",
    "info": "inspect_file:describe",
    # edlab prune
    "prune_structured": "prune:prune_structured", "prune_unstructured": "prune:prune_unstructured",
    "prune_checkpoint": "prune:prune_checkpoint",
    # edlab quantize, export, pack, bench
    "quantize_qat": "quantize:quantize_qat", "binarize": "quantize:binarize", "to_half": "quantize:to_half",
    "calibrate": "quantize:calibrate", "quantize_checkpoint": "quantize:quantize_checkpoint", "fold_bn": "fold:fold_bn",
    "export_onnx": "export:export_onnx", "export_checkpoint": "export:export_checkpoint",
    "pack_checkpoint": "pack:pack", "benchmark": "bench:benchmark", "bench_target": "bench:bench_target",
    # edlab run, demo, sweep, report
    "run_pipeline": "pipeline:run_pipeline", "demo": "pipeline:demo", "sweep": "study:sweep",
    "build_report": "report:build_report",
}

__all__ = ["EdlabError", *sorted(_API)]
__version__ = "0.1.0"


def __getattr__(name: str):
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'edlab' has no attribute '{name}'")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

