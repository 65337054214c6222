"""The model zoo: ``create_model(name, num_classes, **options)`` builds any zoo model by name.

The registry lives in ``_registry.py``; one file per family (``resnet.py``, ...) registers its builders
with :func:`register_model`. Importing this package imports every family, so the registry is full.
"""

from __future__ import annotations

from . import airbench, convnext, resnet  # noqa: F401  (each registers its family)
from ._registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "model_sizes", "register_model"]


def model_sizes() -> dict[str, int]:
    """Parameter count of every registered model (10 classes): what ``edlab models`` lists."""
    return {name: sum(p.numel() for p in create_model(name).parameters()) for name in list_models()}
