"""The model registry (as timm's ``_registry.py``): ``register_model`` records a builder under its function
name, ``create_model(name, num_classes, **options)`` builds it, ``list_models`` names them all.

A module of its own so that the families (resnet.py, airbench.py, convnext.py) import the registry and the
package imports the families, never the other way round. The name and options used are recorded on the
model as ``model.edlab_spec`` so that a checkpoint can rebuild the same architecture in a fresh process
(see ``edlab.checkpoint``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..errors import EdlabError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model. Options are the family's (``width``, ``conv``, ...)."""
    if name not in _REGISTRY:
        raise EdlabError(f"unknown model '{name}' (choices: {', '.join(list_models())})")
    try:
        model = _REGISTRY[name](num_classes=num_classes, **options)
    except TypeError as e:
        raise EdlabError(f"model '{name}': {e}") from None
    model.edlab_spec = {"name": name, "num_classes": num_classes, "options": dict(options)}
    return model
