"""The layer-wise runner: walks the blocks bottom first and hands out one `BlockContext` each.

Block inputs are caught once (`capture.catch_block_inputs`). Then, for each block: the placement
brings it in, one pass with pre-hooks accumulates each site's input statistics (the accumulator
is the method's choice, `Method.new_stats`), the caller works on the context, and the block's
outputs become the next block's inputs: the edited block's (`propagate: compressed`) or the dense
block's (`propagate: dense`, from the statistics pass). Only one block's activations are alive at
a time.

    runner = Runner(adapter, windows, batch_size, device, placement, costs)
    for ctx in runner.blocks(Propagate.dense):                 # profiling: nothing is edited
        curves += method.profile(ctx)
    for ctx in runner.blocks(Propagate.compressed, plan=plan):
        result = method.compress_block(ctx)
        hidden, teacher, seconds = runner.advance(ctx)          # the next block's inputs
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from ..config import Autocast, Propagate
from ..errors import NumericalError
from ..linalg.moments import SecondMoment
from ..models import Adapter, Site
from ..planning.budget import Plan
from ..planning.cost import CostModel
from .capture import catch_block_inputs
from .context import BlockContext, Streams
from .gradients import BlockSaliences
from .placement import Placement

# site, dim, device, where, seed -> the accumulator, or None for a site whose statistics go unread
NewStats = Callable[[Site, int, torch.device, str, int], SecondMoment | None]


def plain_stats(site: Site, dim: int, device: torch.device, where: str, seed: int) -> SecondMoment:
    """The default accumulator: the input second moment and mean, nothing else."""
    return SecondMoment(dim, device=device, where=where, seed=seed)


def autocast_dtype(name: str | Autocast) -> torch.dtype | None:
    """`calib.autocast` as a dtype (None: the calibration forwards run in the model's dtype)."""
    value = Autocast(name).value
    return None if value == Autocast.none.value else getattr(torch, value)


@dataclass
class _Step:
    """The runner's state for the block being worked on."""

    ctx: BlockContext
    propagate: Propagate
    dense_outputs: Streams
    started: float
    next: tuple[Streams, Streams | None, float] | None = field(default=None)


class Runner:
    def __init__(
        self,
        adapter: Adapter,
        windows: torch.Tensor,
        batch_size: int,
        device: torch.device,
        placement: Placement,
        costs: CostModel | None = None,
        new_stats: NewStats = plain_stats,
        saliences: list[BlockSaliences] | None = None,
        dense_pass: bool = True,
        autocast: torch.dtype | None = None,
        scratch: Path | None = None,
    ) -> None:
        """`dense_pass=False`: no statistics pass over a block before the method edits it (no
        site statistics, `ctx.outputs` None), for a method whose blocks cannot run unedited on the
        propagated stream (a sliced residual stream is narrower than the dense block reads).
        `autocast`: the blocks' forwards run under autocast to that dtype (`calib.autocast`).
        `scratch`: a folder where methods may set aside wide statistics (`BlockContext.scratch`)."""
        self.adapter, self.windows, self.batch_size = adapter, windows, batch_size
        self.scratch = scratch
        self.autocast = autocast
        self.saliences = saliences
        self.dense_pass = dense_pass
        self.device, self.placement = device, placement
        self.costs = costs or CostModel(adapter)
        self.new_stats = new_stats
        self._step: _Step | None = None

    def for_planning(self, share: float, autocast: torch.dtype | None) -> Runner:
        """A runner over the first `share` of the windows (at least one) whose forwards run under
        `autocast`, for the planning pass (`calib.profile_share`, `calib.profile_autocast`)."""
        count = max(1, round(share * len(self.windows)))
        windows = self.windows[:count] if count < len(self.windows) else self.windows
        return Runner(
            self.adapter, windows, self.batch_size, self.device, self.placement, self.costs,
            self.new_stats, self.saliences, self.dense_pass, autocast, self.scratch,
        )  # fmt: skip

    def blocks(
        self,
        propagate: Propagate,
        plan: Plan | None = None,
        teacher: bool = False,
        start: int = 0,
        start_inputs: tuple[Streams, Streams] | None = None,
        desc: str = "compress",
    ) -> Iterator[BlockContext]:
        """One context per block from `start` on (blocks before it are done, and `start_inputs`
        are block `start`'s saved (hidden, teacher) inputs). With `teacher` a second stream, the
        dense model's block inputs, runs beside the propagated one (one more block forward per
        block). The caller may call `advance(ctx)` before asking for the next block, to get the
        next block's inputs; otherwise the runner advances on its own."""
        calls = catch_block_inputs(self.adapter, self.windows, self.batch_size, self.device)
        hidden: Streams = calls.hidden
        dense: Streams | None = hidden if teacher else None
        if start_inputs is not None:
            hidden = [h.to(self.device) for h in start_inputs[0]]
            dense = [t.to(self.device) for t in start_inputs[1]] if teacher else None
        if plan is not None and plan.unit != self.costs.unit:
            raise ValueError(
                f"the plan is in {plan.unit.value}, the runner's cost model in {self.costs.unit.value}"
            )
        blocks = list(self.adapter.blocks())
        for i in tqdm(range(start, len(blocks)), desc=desc, unit="block", initial=start, total=len(blocks)):
            block, here = blocks[i], self.placement.device_for(i)  # `here` differs by block when mapped
            self.placement.enter(i, block)
            started = time.perf_counter()
            ctx = BlockContext(
                index=i,
                block=block,
                sites=self.adapter.sites(block),
                stats={},
                targets=plan.for_block(i) if plan is not None else {},
                choices=plan.choices_for(i) if plan is not None else {},
                attention=self.adapter.attention(block),
                costs=self.costs,
                forward=self.adapter.run_block,
                hidden=send_to_device(hidden, here),
                args=send_to_device(calls.args[i], here),
                kwargs=send_to_device(calls.kwargs[i], here),
                teacher_hidden=send_to_device(dense, here),
                saliences=self.saliences[i] if self.saliences is not None else None,
                autocast=self.autocast,
                scratch=self.scratch,
            )
            outputs: Streams = []
            if self.dense_pass:
                ctx.stats, outputs = self._statistics(ctx, here)
                ctx.outputs = outputs
            if ctx.teacher_hidden is not None:
                same = propagate == Propagate.dense and len(outputs) == len(ctx.teacher_hidden)
                ctx.teacher_outputs = outputs if same else ctx.run_all(ctx.teacher_hidden)
            self._step = _Step(ctx, propagate, outputs, started)
            yield ctx
            hidden, dense, _ = self.advance(ctx)
            ctx.stats = {}  # freed before the next block's pass (the caller's loop still holds ctx)
            self.placement.leave(i, block)
        self._step = None

    def advance(self, ctx: BlockContext) -> tuple[Streams, Streams | None, float]:
        """The next block's inputs (propagated, and the dense stream when carried) and the
        seconds spent on this block since it came in; computed once per block."""
        step = self._step
        if step is None or step.ctx is not ctx:
            raise RuntimeError(f"block {ctx.index} is not the runner's current block")
        if step.next is None:
            if step.propagate == Propagate.dense:
                outputs = step.dense_outputs
            else:  # a removed block passes its inputs on
                outputs = ctx.hidden if ctx.removed else ctx.run_all(ctx.hidden)
            if not all(torch.isfinite(o).all() for o in outputs):
                raise NumericalError(
                    f"block {ctx.index} produced non-finite outputs ({step.propagate.value} propagation)"
                )
            step.next = (outputs, ctx.teacher_outputs, time.perf_counter() - step.started)
        return step.next

    def _statistics(self, ctx: BlockContext, here: torch.device) -> tuple[dict[str, SecondMoment], Streams]:
        """One pass over the block with pre-hooks on each site's first linear: the sites' input
        statistics, and the (dense) block's outputs."""
        stats: dict[str, SecondMoment] = {}
        handles = []
        for site in ctx.sites:
            first = ctx.block.get_submodule(site.linears[0])
            acc = self.new_stats(site, first.in_features, here, f"block {ctx.index} {site.name}", ctx.index)
            if acc is None:  # the method never reads this site's statistics
                continue
            stats[site.name] = acc
            handles.append(first.register_forward_pre_hook(lambda _m, args, acc=acc: acc.update(args[0])))
        try:
            outputs = ctx.run_all(ctx.hidden)
        finally:
            for handle in handles:
                handle.remove()
        return stats, outputs
