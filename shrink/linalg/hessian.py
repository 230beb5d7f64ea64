"""The damped Hessian H = XᵀX of a layer's calibration inputs, as GPTQ and SparseGPT use it:
its Cholesky factor and the factor of its inverse, with dead inputs masked."""

from __future__ import annotations

import torch

from ..errors import NumericalError


def damped_hessian(gram: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H + δI, δ = `dampening`·mean diag H (GPTQ's damping), with the diagonal of dead inputs
    (never nonzero on the calibration tokens) set to 1; and their mask."""
    h = gram.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += dampening * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, dead


def damped_cholesky(gram: torch.Tensor, dampening: float, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of the damped Hessian (`damped_hessian`); and the dead inputs' mask."""
    h, dead = damped_hessian(gram, dampening)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise NumericalError(f"{where}: the damped Hessian is not positive definite; raise dampening")
    return factor, dead


def inverse_hessian_factor(
    gram: torch.Tensor, dampening: float, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's U with UᵀU = (H + δI)⁻¹ (upper Cholesky factor of the damped inverse), H = XᵀX / n
    from the streamed moment; and the mask of dead inputs, whose weights are zeroed."""
    factor, dead = damped_cholesky(gram, dampening, where)
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True), dead
