"""What a method sees of one block: the block, its sites and their statistics, its targets, and
the cached inputs to run it on. A method edits `ctx.block` in place and never sees the model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..linalg.moments import CrossMoment, SecondMoment
from ..models import Attention, Site
from ..planning.cost import CostModel
from .gradients import BlockSaliences

Streams = list[torch.Tensor]  # one tensor per calibration batch
# runs one block on (hidden, extra positional arguments, keyword arguments): the family's call
BlockForward = Callable[[nn.Module, torch.Tensor, tuple[Any, ...], dict[str, Any]], torch.Tensor]


@dataclass(kw_only=True)
class BlockContext:
    """Everything a method may use to edit one block; it never sees the rest of the model."""

    index: int
    block: nn.Module
    sites: list[Site]
    stats: dict[str, SecondMoment]
    targets: dict[str, float]  # kept fraction per site (empty while profiling)
    choices: dict[str, dict[str, Any]]  # a schedule's decisions in the method's units (Plan.choices)
    attention: Attention  # the named projections and head counts of this block
    costs: CostModel  # prices in the budget unit
    forward: BlockForward
    hidden: Streams
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    # methods with `needs_teacher`: the dense model's inputs of this block on the same windows,
    # and the dense block's outputs on them (computed before the method edits the block)
    teacher_hidden: Streams | None = None
    teacher_outputs: Streams | None = None
    outputs: Streams | None = None  # the block's outputs on `hidden` before any edit
    # methods with `needs_gradients`: the block linears' Taylor saliences from the gradient pass
    # over the whole dense model (blocks/gradients.py)
    saliences: BlockSaliences | None = None
    # set by a method that removes the whole block: its output is its input from here on, and the
    # run deletes it from the model once every block is done
    removed: bool = False
    # the block's forwards on calibration windows run under autocast to this dtype (None: as stored)
    autocast: torch.dtype | None = None
    # where a method may set aside a wide site's statistics while it needs the memory for something
    # else (SecondMoment.set_aside); None keeps them in memory (set with `stream=true`)
    scratch: Path | None = None

    def site(self, name: str) -> Site:
        return next(s for s in self.sites if s.name == name)

    def price(self, *names: str) -> int:
        """The named sites' cost now, in the budget unit."""
        return sum(self.costs.price(self.block, self.site(n)) for n in names)

    def residual_energy(self, streams: Streams | None = None) -> float:
        """The typical token's ‖h‖² in the residual stream entering the block, or in `streams` (the
        median over the calibration tokens): what an error added to it is measured against.
        Not the mean: from the middle of a Llama-style model on, a few tokens (the first one, as an
        attention sink) carry "massive activations" whose norm alone dominates the mean (above 95%
        of Σ‖h‖² in SmolLM2's blocks 12–28), which would make those blocks look nearly free."""
        streams = self.hidden if streams is None else streams
        norms = torch.cat([h.to(torch.float64).pow(2).sum(-1).flatten() for h in streams])
        return float(norms.median()) if norms.numel() else 0.0

    def run(
        self, hidden: torch.Tensor, batch: int, rows: slice | None = None, block: nn.Module | None = None
    ) -> torch.Tensor:
        """The block (or `block`, a copy of it) on `hidden` with calibration batch `batch`'s extra
        inputs; `rows` selects windows of that batch (then `hidden` holds only those rows)."""
        args, kwargs = self.args[batch], self.kwargs[batch]
        if rows is not None:
            size = self.hidden[batch].shape[0]
            args, kwargs = take_rows(args, rows, size), take_rows(kwargs, rows, size)
        with self.precision():
            return self.forward(self.block if block is None else block, hidden, args, kwargs)

    def precision(self) -> contextlib.AbstractContextManager:
        """Autocast for the block's forwards (`calib.autocast`), or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.block_device().type, dtype=self.autocast)

    def block_device(self) -> torch.device:
        return next(self.block.parameters()).device

    def linear_input(
        self,
        path: str,
        hidden: torch.Tensor,
        batch: int,
        rows: slice | None = None,
        block: nn.Module | None = None,
    ) -> torch.Tensor:
        """The input of the block's linear at `path` when the block as it is now (or `block`, a
        copy of it) runs on `hidden` (batch `batch`); the forward stops there, so what comes after
        it is not computed."""
        seen: list[torch.Tensor] = []

        def hook(_module, args):
            seen.append(args[0].detach())
            raise _Captured

        handle = (self.block if block is None else block).get_submodule(path).register_forward_pre_hook(hook)
        try:
            with torch.no_grad(), contextlib.suppress(_Captured):
                self.run(hidden, batch, rows, block)
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"block {self.index}: the forward never reached {path}")
        return seen[0]

    def cross_moments(self, names: list[str]) -> dict[str, CrossMoment]:
        """Moments of the named sites' inputs on the propagated stream against the dense stream
        (same windows, the block as it is now): what a fold needs to fit the dense function."""
        if self.teacher_hidden is None:
            raise RuntimeError("cross moments need the dense stream: set the method's needs_teacher")
        seen: dict[str, torch.Tensor] = {}
        handles, acc = [], {}
        for name in names:
            first = self.block.get_submodule(self.site(name).linears[0])
            where = f"block {self.index} {name}"
            acc[name] = CrossMoment(first.in_features, first.weight.device, where)
            hook = lambda _m, args, name=name: seen.__setitem__(name, args[0])  # noqa: E731
            handles.append(first.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                for b, (x, y) in enumerate(zip(self.hidden, self.teacher_hidden, strict=True)):
                    self.run(x, b)
                    ours = dict(seen)
                    self.run(y, b)
                    for name in names:
                        acc[name].update(ours[name], seen[name])
        finally:
            for handle in handles:
                handle.remove()
        return acc

    def run_all(self, inputs: Streams) -> Streams:
        """The block on every calibration batch of `inputs`."""
        with torch.no_grad(), self.precision():
            return [self.forward(self.block, h, self.args[b], self.kwargs[b]) for b, h in enumerate(inputs)]


class _Captured(Exception):
    """Ends a block's forward once the input wanted has been seen."""


def take_rows(value: Any, rows: slice, batch: int) -> Any:
    """`value` (cached block arguments) restricted to windows `rows` of a batch of `batch` windows:
    tensors whose first dimension is the batch are sliced; broadcast ones (first dimension 1, as
    rotary tables) and everything else pass through unchanged."""
    if isinstance(value, torch.Tensor):
        return value[rows] if batch > 1 and value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(take_rows(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [take_rows(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch) for k, v in value.items()}
    return value


@dataclass
class BlockResult:
    records: list[dict[str, Any]]  # one row per compressed linear (or pruned site)
    spectra: dict[str, Any]  # name -> 1-D array of singular values / eigenvalues
