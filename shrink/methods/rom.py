"""`rom`: LLM-ROM (Chavan et al.) — PCA of each layer's output features.

With C the second moment of the inputs this layer actually receives (the compressed model's, by
default propagation), the principal directions of the outputs Y = XWᵀ are the top eigenvectors
V_r of W C Wᵀ; W becomes the pair V_r · (V_rᵀ W). The discarded eigenvalues are exactly the
squared output error, and no rank-r map of the outputs does better (Eckart–Young on Y).

`center: true` takes the PCA of the centred outputs (C − μμᵀ) and moves the mean's discarded
part into a bias: b' = b + (I − V_r V_rᵀ) W μ. It then adds an `out`-sized bias to layers that had
none, which the budget counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FoldTarget, MethodConf
from ..errors import NumericalError
from ..linalg.moments import SecondMoment
from . import register
from .lowrank import Factorisation, LowRank


@dataclass
class ROMConf(MethodConf):
    name: str = "rom"
    center: bool = False  # PCA of centred outputs, the mean folded into a (counted) bias
    target: FoldTarget = FoldTarget.compressed  # dense: refit each left factor on dense targets
    target_ridge: float = 1e-2  # target=dense: λ/mean(diag) of the refit, shrinking towards the fit


@register("rom", ROMConf)
class ROM(LowRank):
    @property
    def adds_bias(self) -> bool:  # type: ignore[override]
        return bool(self.cfg.center)

    def factorise(self, linear: nn.Linear, stats: SecondMoment | None) -> Factorisation:
        if stats is None:
            raise NumericalError("rom needs the input statistics of every site")
        w = linear.weight.detach().to(torch.float64)
        c, mu = stats.moment(), stats.mean()
        if self.cfg.center:
            c = c - torch.outer(mu, mu)
        cov = w @ c @ w.T
        cov = 0.5 * (cov + cov.T)
        if not torch.isfinite(cov).all():
            raise NumericalError(f"non-finite output covariance at {stats.where}")
        values, vectors = torch.linalg.eigh(cov)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
        bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None

        def build(rank: int):
            v = vectors[:, :rank]
            right = v.T @ w
            new_bias = bias
            if self.cfg.center:
                mean_out = w @ mu
                new_bias = (bias if bias is not None else 0.0) + mean_out - v @ (v.T @ mean_out)
            return v, right, new_bias

        return Factorisation(values, build, values)
