"""Streaming second moments of layer inputs: memory O(d^2), never O(tokens)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import NumericalError


class SecondMoment:
    """Accumulates XᵀX and Σx in float64 over any number of token batches.

    With `sketch_rows` > 0 it also accumulates a Gaussian row sketch ΩX (sketch_rows × dim), drawn
    batch by batch from a seeded generator, for methods that check against an explicit matrix.
    With `batch_dtype=torch.float32` each batch's XᵀX is computed in single precision (about twice
    as fast on a CPU; relative error about 1e-6 per batch) and summed in float64 (slab by slab, so
    no float64 copy of a 11008-wide product is made): for methods whose solves are
    ridge-regularised far above that (id's λ = 1e-2·mean diag), not for whitening.
    With `parts` > 1 it also keeps the Gram of each of that many disjoint groups of windows
    (window i of the stream goes to group i mod parts), for cross-validation over windows; the
    parts cost `parts` more d×d matrices.
    """

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        where: str = "",
        sketch_rows: int = 0,
        seed: int = 0,
        batch_dtype: torch.dtype = torch.float64,
        parts: int = 0,
    ) -> None:
        self.batch_dtype = batch_dtype
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.parts = [torch.zeros_like(self.xtx) for _ in range(parts if parts > 1 else 0)]
        self._windows = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0
        self.where = where
        self.sketch = (
            torch.zeros(sketch_rows, dim, dtype=torch.float64, device=device) if sketch_rows else None
        )
        self._gen = torch.Generator(device=device).manual_seed(seed) if sketch_rows else None

    def update(self, x: torch.Tensor) -> None:
        if self.parts:
            windows = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x.detach()[None]
            for group in range(len(self.parts)):  # window i of the stream goes to part i mod parts
                picked = [w for i, w in enumerate(windows) if (self._windows + i) % len(self.parts) == group]
                if picked:
                    self._add(torch.cat(picked), self.parts[group])
            self._windows += len(windows)
            return
        self._add(x, None)

    def _add(self, x: torch.Tensor, part: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.xtx.device)
        if not torch.isfinite(x).all():
            raise NumericalError(f"non-finite activations at the input of {self.where or 'a site'}")
        if self.batch_dtype == torch.float64 or self.sketch is not None:
            x = x.to(torch.float64)
            if part is None:
                self.xtx.addmm_(x.T, x)
            else:
                product = x.T @ x
                self.xtx.add_(product)
                part.add_(product)
        else:
            x = x.to(self.batch_dtype)
            product = x.T @ x
            for start in range(0, product.shape[0], 1024):  # widened to float64 a slab at a time
                self.xtx[start : start + 1024].add_(product[start : start + 1024])
                if part is not None:
                    part[start : start + 1024].add_(product[start : start + 1024])
        if self.sketch is not None:
            omega = torch.randn(
                self.sketch.shape[0], x.shape[0], generator=self._gen, dtype=x.dtype, device=x.device
            )
            self.sketch.addmm_(omega, x)
        self.sum += x.sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    @property
    def dim(self) -> int:
        return self.xtx.shape[0]

    def moment(self) -> torch.Tensor:
        """E[xxᵀ] (uncentred), the matrix every activation-aware method works with."""
        if self.count == 0:
            raise NumericalError(f"no tokens reached {self.where or 'a site'}")
        return self.xtx / self.count

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


class CrossMoment:
    """Accumulates, at one site, the moments of two streams seen on the same tokens: x, the input
    the edited block will get (the compressed model's), and y, the dense model's. ΣxyᵀΣ, Σyyᵀ and
    Σy let a fold fit the dense function (the dense targets) without keeping activations."""

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        where: str = "",
        batch_dtype: torch.dtype = torch.float64,
    ) -> None:
        # each batch's products in `batch_dtype`, summed in float64 (as SecondMoment's)
        self.batch_dtype = batch_dtype
        self.x = SecondMoment(dim, device=device, where=where, batch_dtype=batch_dtype)  # x's own moments
        self.xty = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.yty = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.sum_y = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0
        self.where = where

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.xty.device, self.batch_dtype)
        y = y.detach().reshape(-1, y.shape[-1]).to(self.xty.device, self.batch_dtype)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise NumericalError(f"non-finite activations at the input of {self.where or 'a site'}")
        self.x.update(x)
        self.xty += (x.T @ y).to(torch.float64)
        self.yty += (y.T @ y).to(torch.float64)
        self.sum_y += y.sum(0, dtype=torch.float64)
        self.count += x.shape[0]


class Moments(NamedTuple):
    """A linear's input moments: H = X̃ᵀX̃ of the inputs it gets; with a dense target (GPTAQ) also
    XᵀX̃ and XᵀX of the reference inputs X."""

    gram: torch.Tensor
    cross: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    def map(self, edit) -> Moments:
        return Moments(*(None if m is None else edit(m) for m in self))
