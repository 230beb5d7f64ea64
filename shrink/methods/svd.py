"""`svd`: truncated SVD of every block weight, data-free.

Each linear keeps the largest rank whose pair costs at most its target fraction; a matrix where
no rank is cheaper than the dense weight stays dense. Errors are still measured on the
calibration inputs so every method's `layers.jsonl` is comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConf
from ..linalg.decompositions import truncated_svd
from ..linalg.moments import SecondMoment
from . import register
from .lowrank import Factorisation, LowRank


@dataclass
class SVDConf(MethodConf):
    name: str = "svd"


@register("svd", SVDConf)
class SVD(LowRank):
    def factorise(self, linear: nn.Linear, stats: SecondMoment | None) -> Factorisation:
        left, right, singular = truncated_svd(linear.weight, min(linear.weight.shape))
        bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
        return Factorisation(singular**2, lambda r: (left[:, :r], right[:r], bias), singular)
