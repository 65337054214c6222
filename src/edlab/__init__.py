"""edlab: efficient deep learning on CIFAR — train, compress, score and compare ResNets."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, load_train_config
from .data import get_data
from .errors import EdlabError
from .models import create_model, list_models, register_model
from .prune import prune_structured, prune_unstructured
from .score import profile, score  # noqa: E402  (edlab.score is the formula; the module stays importable)

__all__ = [
    "EdlabError", "TrainConfig", "create_model", "get_data", "list_models", "load_checkpoint",
    "load_train_config", "profile", "prune_structured", "prune_unstructured", "register_model",
    "save_checkpoint", "score",
]
__version__ = "0.1.0"
