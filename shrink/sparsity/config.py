"""The keys of the sparsity step (`conf/sparsity/`), shared by every sparsifier."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from ..config import StepConf


@dataclass
class SparsityConf(StepConf):
    """Weight sparsity after the method's edit, before quantization."""

    name: str = MISSING
    pattern: str = "unstructured"  # or N:M (N kept of every M consecutive inputs), e.g. 2:4
    fraction: float = 0.5  # unstructured: the share of each linear's weights set to zero
    dampening: float = 0.01  # sparsegpt: δ/mean diag H added to the Hessian's diagonal
