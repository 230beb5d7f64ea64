"""`svdllm`: truncation-aware data whitening (SVD-LLM, Wang et al.).

S = Cholesky(C + λI) of the input second moment; the SVD of W S = U Σ Vᵀ truncated at rank r
gives the pair (U_r Σ_r) · (V_rᵀ S⁻¹). Because ‖(W − Ŵ)X‖² = ‖(W − Ŵ)S‖²_F when C = S Sᵀ, the
squared output error is exactly the sum of the discarded σ_i², so truncating the smallest
singular values is the right choice. λ = `ridge`·mean(diag C) (default 0); when C is singular
(dead inputs, fewer tokens than dimensions) λ rises tenfold from 1e-10 until the Cholesky
succeeds; the λ/mean(diag C) used is each row's `whitening_ridge` in layers.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FoldTarget, MethodConf
from ..errors import NumericalError
from ..linalg.decompositions import whitening
from ..linalg.moments import SecondMoment
from . import register
from .lowrank import Factorisation, LowRank


@dataclass
class SVDLLMConf(MethodConf):
    name: str = "svdllm"
    ridge: float = 0.0  # λ/mean(diag C) added before the Cholesky; raised from 1e-10 if C is singular
    target: FoldTarget = FoldTarget.compressed  # dense: refit each left factor on dense targets
    target_ridge: float = 1e-2  # target=dense: λ/mean(diag) of the refit, shrinking towards the fit


@register("svdllm", SVDLLMConf)
class SVDLLM(LowRank):
    def factorise(self, linear: nn.Linear, stats: SecondMoment | None) -> Factorisation:
        if stats is None:
            raise NumericalError("svdllm needs the input statistics of every site")
        w = linear.weight.detach().to(torch.float64)
        s, ridge = whitening(stats.moment(), float(self.cfg.ridge))
        u, sigma, vh = torch.linalg.svd(w @ s, full_matrices=False)
        bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None

        def build(rank: int):
            right = torch.linalg.solve_triangular(s, vh[:rank], upper=False, left=False)
            return u[:, :rank] * sigma[:rank], right, bias

        return Factorisation(sigma**2, build, sigma, {"whitening_ridge": ridge})
