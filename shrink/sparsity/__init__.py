"""Weight sparsity stacked on any method, before quantization: SparseGPT, Wanda, unstructured or
N:M. Sparsifiers register in `SPARSIFIERS` where they are written; `sparsity=none` is no plug-in."""

from __future__ import annotations

from ..registry import Registry
from .base import Sparsifier
from .config import SparsityConf

SPARSIFIERS: Registry[type[Sparsifier]] = Registry("sparsity", __name__, builtin=("none",))
SPARSIFIERS.store("sparsity", SparsityConf)

__all__ = ["SPARSIFIERS", "Sparsifier", "SparsityConf"]
