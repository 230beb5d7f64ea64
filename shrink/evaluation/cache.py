"""Cache of the dense model's evaluation, so sweeps over methods and budgets score it once.

An entry is keyed by everything that decides the dense score: the model config without its
placement (`device_map`, `max_memory`), the seed of a tiny random model, the dtype, the device
type, the evaluator and a fingerprint of the exact data it reads (for perplexity, the token
windows themselves, so a changed tokenizer, corpus split or `max_tokens` misses). Entries are
small JSON files under `<cache>/dense-eval/` (`SHRINK_EVAL_CACHE` overrides the folder; delete
it to reset). `eval.cache_dense: false` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..data.assets import cache_root


def cache_dir() -> Path:
    env = os.environ.get("SHRINK_EVAL_CACHE")
    return Path(env) if env else cache_root() / "dense-eval"


def dense_key(model: dict[str, Any], dtype: str, device: str, evaluator: str, data: dict) -> str:
    """Hex key of one dense evaluation: `model` is the model's identity (`models.model_identity`),
    `data` names the evaluator's settings and data fingerprint."""
    identity = {"model": model, "dtype": dtype, "device": device, "evaluator": evaluator, "data": data}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load(key: str) -> dict[str, Any] | None:
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(key: str, value: dict[str, Any]) -> None:
    """Write atomically (rename), so parallel sweep jobs never read half an entry."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=key, suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
    os.replace(tmp, folder / f"{key}.json")
