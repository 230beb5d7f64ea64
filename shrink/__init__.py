"""shrink: compress pretrained transformers without retraining.

    import shrink
    result = shrink.compress("smollm2-135m", method="id", budget=0.5)
    scores = shrink.evaluate(result.model, result.tokenizer, suite="ppl")
    model = shrink.load("outputs/…/model")

The names below are imported on first use, so `import shrink.x` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import NumericalError, ShrinkError

__version__ = "0.1.0"

_LAZY = {
    "compress": "shrink.api",
    "evaluate": "shrink.api",
    "Compressed": "shrink.api",
    "load": "shrink.checkpoints.save_load",
    "load_tokenizer": "shrink.checkpoints.save_load",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shrink' has no attribute {name!r}")


__all__ = ["NumericalError", "ShrinkError", "__version__", *_LAZY]
