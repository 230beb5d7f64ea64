"""shrink: compress pretrained transformers without retraining."""

from .checkpoints.save_load import load, load_tokenizer
from .errors import NumericalError, ShrinkError

__version__ = "0.1.0"
__all__ = ["NumericalError", "ShrinkError", "__version__", "load", "load_tokenizer"]
