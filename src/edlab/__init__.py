"""edlab: efficient deep learning on CIFAR — train, compress, score and compare ResNets."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, load_train_config
from .data import get_data
from .errors import EdlabError
from .export import export_onnx
from .models import create_model, list_models, register_model
from .prune import prune_structured, prune_unstructured
from .quantize import binarize, quantize_qat
from .score import profile, score  # edlab.score is the formula; `from edlab.score import ...` still works

__all__ = [
    "EdlabError", "TrainConfig", "binarize", "create_model", "export_onnx", "get_data", "list_models",
    "load_checkpoint", "load_train_config", "profile", "prune_structured", "prune_unstructured", "quantize_qat",
    "register_model", "save_checkpoint", "score",
]
__version__ = "0.1.0"
