"""Streaming second moments of layer inputs: memory O(d^2), never O(tokens)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import NumericalError

# below this many entries (a 4096-wide moment) the d×d matrices are never set aside
_SET_ASIDE_ENTRIES = 4096 * 4096 + 1


def _written(folder: Path, matrices: list[torch.Tensor]) -> Path:
    """The matrices, one after the other, in a new file of `folder`."""
    handle, name = tempfile.mkstemp(suffix=".f64", dir=folder)
    with os.fdopen(handle, "wb") as out:
        for m in matrices:
            m.numpy().tofile(out)
    return Path(name)


def _read_rows(path: Path, matrix: int, index: torch.Tensor, d: int) -> torch.Tensor:
    """Rows `index` of the `matrix`-th d×d float64 matrix of a file `_written` wrote."""
    out = np.empty((len(index), d), dtype=np.float64)
    with open(path, "rb") as source:
        for i, row in enumerate(index.tolist()):
            source.seek((matrix * d + row) * d * 8)
            source.readinto(memoryview(out[i]).cast("B"))
    return torch.from_numpy(out)


def _product_slabs(x: torch.Tensor, width: int = 4096) -> Iterator[tuple[int, torch.Tensor]]:
    """XᵀX by slabs of 1024 rows: one product when it has at most `width` rows, else each slab
    computed on its own, so a wide site (11008) never holds its whole batch product at once."""
    d = x.shape[-1]
    product = x.T @ x if d <= width else None
    for start in range(0, d, 1024):
        end = min(start + 1024, d)
        yield start, product[start:end] if product is not None else x[:, start:end].T @ x


class SecondMoment:
    """Accumulates XᵀX and Σx in float64 over any number of token batches.

    With `sketch_rows` > 0 it also accumulates a Gaussian row sketch ΩX (sketch_rows × dim), drawn
    batch by batch from a seeded generator, for methods that check against an explicit matrix.
    With `batch_dtype=torch.float32` each batch's XᵀX is computed in single precision (about twice
    as fast on a CPU; relative error about 1e-6 per batch) and summed in float64 (slab by slab, so
    no float64 copy of a 11008-wide product is made): for methods whose solves are
    ridge-regularised far above that (id's λ = 1e-2·mean diag), not for whitening.
    With `parts` > 1 it also keeps the Gram of each of that many disjoint groups of windows
    (window i of the stream goes to group i mod parts), for cross-validation over windows: all
    but the last are stored (`parts` − 1 more d×d matrices), the last is XᵀX minus the others,
    read by rows (`part_rows`).
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
        self.groups = parts if parts > 1 else 0
        self.parts = [torch.zeros_like(self.xtx) for _ in range(self.groups - 1)]  # the last is derived
        self._parts_file: Path | None = None  # where `set_aside` moved the parts to
        self._aside: Path | torch.Tensor | None = None  # XᵀX while set aside (its file, or a host copy)
        self._windows = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0
        self.where = where
        self.sketch = (
            torch.zeros(sketch_rows, dim, dtype=torch.float64, device=device) if sketch_rows else None
        )
        self._gen = torch.Generator(device=device).manual_seed(seed) if sketch_rows else None

    def update(self, x: torch.Tensor) -> None:
        if self.groups:
            windows = x.detach().reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x.detach()[None]
            for group in range(self.groups):  # window i of the stream goes to part i mod parts
                picked = [w for i, w in enumerate(windows) if (self._windows + i) % self.groups == group]
                if picked:
                    part = self.parts[group] if group < len(self.parts) else None
                    self._add(torch.cat(picked), part)
            self._windows += len(windows)
            return
        self._add(x, None)

    def part_rows(self, group: int, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of group `group`'s Gram (the last group's is XᵀX minus the stored ones)."""
        if group < self.groups - 1:
            return self._stored_rows(group, index)
        rows = self.rows(index)
        for stored in range(self.groups - 1):
            rows -= self._stored_rows(stored, index)
        return rows

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of XᵀX, also while it is set aside (read from its file)."""
        if self._aside is None:
            return self.xtx[index]
        if isinstance(self._aside, torch.Tensor):
            return self._aside[index.cpu()].to(self.sum.device)
        return _read_rows(self._aside, 0, index, len(self.sum)).to(self.sum.device)

    def xtx_into(self, out: torch.Tensor) -> torch.Tensor:
        """XᵀX copied into `out` (any layout), also while it is set aside: read 256 rows at a time."""
        if self._aside is None:
            return out.copy_(self.xtx)
        d = len(self.sum)
        for start in range(0, d, 256):
            out[start : start + 256] = self.rows(torch.arange(start, min(start + 256, d)))
        return out

    def quadratic_form(self, left: torch.Tensor) -> torch.Tensor:
        """tr(L XᵀX Lᵀ) for L (out × d), 1024 columns of L at a time: no out × d product is made,
        and XᵀX may be set aside (its rows are then read from the file)."""
        left = left.to(torch.float64)
        total = torch.zeros((), dtype=torch.float64, device=left.device)
        d = len(self.sum)
        for start in range(0, d, 1024):
            index = torch.arange(start, min(start + 1024, d), device=left.device)
            # Σ_ij (LᵀL)_ij G_ij over these rows i of G
            total += ((left[:, start : start + len(index)].T @ left) * self.rows(index)).sum()
        return total

    def _stored_rows(self, group: int, index: torch.Tensor) -> torch.Tensor:
        if self._parts_file is None:
            return self.parts[group][index.to(self.parts[group].device)].to(self.sum.device)
        return _read_rows(self._parts_file, group, index, len(self.sum)).to(self.sum.device)

    @contextlib.contextmanager
    def set_aside(self, folder: Path | None) -> Iterator[None]:
        """Frees XᵀX while a step needs the memory for its own matrices (a wide FFN's selection
        Gram and its fold's systems hold as much again): written to a file in `folder`, read by
        rows meanwhile (`rows`, `xtx_into`, `quadratic_form`, `part_rows`) and read back bit for bit
        afterwards; on an accelerator it waits on the host instead. The groups' Grams, read only by
        cross-validation, stay in their file from then on. Nothing is set aside when `folder` is
        None or the matrix is small (up to 4096 wide)."""
        if folder is None or self._aside is not None or self.xtx.numel() < _SET_ASIDE_ENTRIES:
            yield  # nothing to do, or already set aside by an enclosing step
            return
        device, shape = self.xtx.device, self.xtx.shape
        if device.type != "cpu":
            self._aside, self.parts = self.xtx.cpu(), [part.cpu() for part in self.parts]
        else:
            folder.mkdir(parents=True, exist_ok=True)
            if self.parts:
                self._parts_file = _written(folder, self.parts)
                weakref.finalize(self, self._parts_file.unlink, missing_ok=True)
                self.parts = []
            self._aside = _written(folder, [self.xtx])
        self.xtx = None  # type: ignore[assignment]
        try:
            yield
        finally:
            aside, self._aside = self._aside, None
            if isinstance(aside, torch.Tensor):
                self.xtx = aside.to(device)
            else:
                self.xtx = torch.from_numpy(np.fromfile(aside, np.float64).reshape(shape))
                aside.unlink()

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
            for start, slab in _product_slabs(x):  # widened to float64 a slab at a time
                self.xtx[start : start + len(slab)].add_(slab)
                if part is not None:
                    part[start : start + len(slab)].add_(slab)
        if self.sketch is not None:
            omega = torch.randn(
                self.sketch.shape[0], x.shape[0], generator=self._gen, dtype=x.dtype, device=x.device
            )
            self.sketch.addmm_(omega, x)
        self.sum += x.sum(0, dtype=torch.float64)
        self.count += x.shape[0]

    @property
    def dim(self) -> int:
        return len(self.sum)

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
