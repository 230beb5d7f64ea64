"""The layer-by-layer runner: catch block inputs once, then compress block after block.

Block inputs are caught by replacing every block's forward with a stub that records what the model
passes it (hidden states, masks, position embeddings: per block, since some architectures give
different blocks different masks) and hands the hidden states on unchanged, so no block computes.
Then, for each block: accumulate per-site input second moments (streaming, float64), let the
method edit the block, and produce the next block's inputs from the compressed block
(`propagate: compressed`) or the dense one (`propagate: dense`). Only one block's activations are
alive at a time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from .budget import BudgetUnit, Curve, Plan, PlanInputs, site_cost
from .config import Propagate
from .errors import NumericalError
from .models import Adapter, HeadLayout, Site
from .placement import Placement, Resident
from .schedules import uniform
from .stats import SecondMoment


class _StopForward(Exception):
    pass


@dataclass
class Calls:
    """What one block receives for every calibration batch."""

    hidden: list[torch.Tensor]
    args: list[list[tuple[Any, ...]]]  # [block][batch]
    kwargs: list[list[dict[str, Any]]]  # [block][batch]


@dataclass
class BlockContext:
    """Everything a method may use to edit one block; it never sees the rest of the model."""

    index: int
    block: nn.Module
    sites: list[Site]
    stats: dict[str, SecondMoment]
    targets: dict[str, float]
    choices: dict[str, dict[str, Any]]  # a schedule's decisions in the method's units (Plan.choices)
    heads: HeadLayout
    unit: BudgetUnit
    adapter: Adapter
    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    seq_len: int = 0  # context length of attention-score MACs (budget_unit: macs)
    # methods with `needs_teacher`: the dense model's inputs of this block on the same windows,
    # and the dense block's outputs on them (computed before the method edits the block)
    teacher_hidden: list[torch.Tensor] | None = None
    teacher_outputs: list[torch.Tensor] | None = None

    def site_cost(self, site: Site) -> int:
        return site_cost(self.adapter, self.block, site, self.seq_len).of(self.unit)

    def run(self, hidden: torch.Tensor, batch: int, rows: slice | None = None) -> torch.Tensor:
        """The block on `hidden` with calibration batch `batch`'s extra inputs; `rows` selects
        windows of that batch (then `hidden` holds only those rows)."""
        args, kwargs = self.args[batch], self.kwargs[batch]
        if rows is not None:
            size = self.hidden[batch].shape[0]
            args, kwargs = take_rows(args, rows, size), take_rows(kwargs, rows, size)
        return self.adapter.run_block(self.block, hidden, args, kwargs)


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


@torch.no_grad()
def catch_block_inputs(
    adapter: Adapter, windows: torch.Tensor, batch_size: int, device: torch.device
) -> Calls:
    blocks = adapter.blocks()
    calls = Calls([], [[] for _ in blocks], [[] for _ in blocks])
    last = len(blocks) - 1

    def stub_for(i: int) -> Callable:
        def stub(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if i == 0:
                calls.hidden.append(hidden.detach())
            calls.args[i].append(args)
            calls.kwargs[i].append(kwargs)
            if i == last:
                raise _StopForward
            return hidden

        return stub

    with replaced_forwards(blocks, [stub_for(i) for i in range(len(blocks))]):
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                adapter.forward(ids)
    return calls


@contextlib.contextmanager
def replaced_forwards(blocks: Sequence[nn.Module], forwards: Sequence[Callable]) -> Iterator[None]:
    """Swap each block's forward for a stub, then restore what was there: the class's forward,
    or the wrapper that accelerate's hooks put on the instance (device-mapped models)."""
    saved = [block.__dict__.get("forward") for block in blocks]
    for block, forward in zip(blocks, forwards, strict=True):
        block.forward = forward
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _collect_stats(
    ctx_block: nn.Module,
    sites: list[Site],
    index: int,
    run_all: Callable[[], list[torch.Tensor]],
    device,
    sketch_rows: Callable[[Site, int], int],
) -> tuple[dict[str, SecondMoment], list[torch.Tensor]]:
    """One pass over the block with pre-hooks on each site's first linear; returns stats and outputs."""
    stats: dict[str, SecondMoment] = {}
    handles = []
    for site in sites:
        first = ctx_block.get_submodule(site.linears[0])
        dim = first.in_features
        stats[site.name] = acc = SecondMoment(
            dim,
            device=device,
            where=f"block {index} {site.name}",
            sketch_rows=sketch_rows(site, dim),
            seed=index,
        )
        handles.append(first.register_forward_pre_hook(lambda _m, args, acc=acc: acc.update(args[0])))
    try:
        outputs = run_all()
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def compress_layerwise(
    adapter: Adapter,
    windows: torch.Tensor,
    batch_size: int,
    compress_block: Callable[[BlockContext], BlockResult],
    plan: Plan,
    propagate: Propagate,
    device: torch.device,
    on_block: Callable[..., None],
    sketch_rows: Callable[[Site, int], int] = lambda site, dim: 0,
    seq_len: int = 0,
    desc: str = "compress",
    needs_teacher: bool = False,
    start: int = 0,
    start_inputs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    placement: Placement | None = None,
) -> None:
    """Compress every block in order, bottom first; `on_block(index, result, seconds, outputs,
    teacher_outputs)` reports as it goes, with the next block's inputs. With `needs_teacher` a
    second stream of block inputs, the dense model's, runs beside the compressed one (one more
    block forward per block). `start` > 0 resumes: blocks before it are done, and `start_inputs`
    are block `start`'s (hidden, teacher) inputs as saved by `on_block`. `placement` brings each
    block to `device` (or in from a store) and takes it away after `on_block` (default: the
    model is loaded, and on an accelerator only the current block is there)."""
    placement = placement or Resident(device)
    calls = catch_block_inputs(adapter, windows, batch_size, device)
    hidden = calls.hidden
    teacher = hidden if needs_teacher else None
    if start_inputs is not None:
        hidden = [h.to(device) for h in start_inputs[0]]
        teacher = [t.to(device) for t in start_inputs[1]] if needs_teacher else None
    heads = adapter.heads()
    blocks = list(adapter.blocks())
    for i in tqdm(range(start, len(blocks)), desc=desc, unit="block", initial=start, total=len(blocks)):
        block, here = blocks[i], placement.device_for(i)  # `here` differs by block in mapped models
        placement.enter(i, block)
        sites = adapter.sites(block)
        hidden = send_to_device(hidden, here)
        teacher = send_to_device(teacher, here)
        args, kwargs = send_to_device(calls.args[i], here), send_to_device(calls.kwargs[i], here)

        @torch.no_grad()
        def run_all(block=block, inputs=hidden, args=args, kwargs=kwargs) -> list[torch.Tensor]:
            return [adapter.run_block(block, h, args[b], kwargs[b]) for b, h in enumerate(inputs)]

        t0 = time.perf_counter()
        stats, outputs = _collect_stats(block, sites, i, run_all, here, sketch_rows)
        teacher_out = None
        if teacher is not None:
            same = propagate == Propagate.dense and len(outputs) == len(teacher)
            teacher_out = outputs if same else run_all(inputs=teacher)
        ctx = BlockContext(
            i,
            block,
            sites,
            stats,
            plan.for_block(i),
            plan.choices_for(i),
            heads,
            plan.unit,
            adapter,
            hidden,
            args,
            kwargs,
            seq_len,
            teacher,
            teacher_out,
        )
        result = compress_block(ctx)
        if propagate == Propagate.compressed:
            outputs = run_all()
        seconds = time.perf_counter() - t0
        if not all(torch.isfinite(o).all() for o in outputs):
            raise NumericalError(f"block {i} produced non-finite outputs ({propagate.value} propagation)")
        hidden, teacher = outputs, teacher_out
        on_block(i, result, seconds, hidden, teacher)
        placement.leave(i, block)


def profile_layerwise(
    adapter: Adapter,
    windows: torch.Tensor,
    batch_size: int,
    profile_block: Callable[[BlockContext], list[Curve]],
    unit: BudgetUnit,
    device: torch.device,
    seq_len: int = 0,
    sketch_rows: Callable[[Site, int], int] = lambda site, dim: 0,
    placement: Placement | None = None,
) -> list[Curve]:
    """The planning pass of schedules that allocate by error: every block's statistics on the
    dense model's own activations, handed to the method's `profile`; nothing is edited."""
    curves: list[Curve] = []

    def profile(ctx: BlockContext) -> BlockResult:
        curves.extend(profile_block(ctx))
        return BlockResult([], {})

    plan = uniform(PlanInputs(adapter, 1.0, unit, seq_len, prunes_heads=True))
    compress_layerwise(
        adapter,
        windows,
        batch_size,
        profile,
        plan,
        Propagate.dense,
        device,
        lambda *_: None,
        sketch_rows=sketch_rows,
        seq_len=seq_len,
        desc="profile",
        placement=placement,
    )
    return curves


@torch.no_grad()
def forward_by_blocks(
    adapter: Adapter,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    placement: Placement,
    desc: str = "forward",
) -> Iterator[tuple[torch.Tensor, Any]]:
    """The model's outputs on `windows`, one batch at a time, computed block by block (for
    `stream=true`, where the blocks come from a store): each block is brought in once, run on
    every batch and released; then the model runs once more per batch with every block replaced
    by a stub, the last one returning the stored output, so the model's own code applies the final
    norm and head. Yields (input ids, model output) per batch; holds one block and the hidden
    states of all windows."""
    calls = catch_block_inputs(adapter, windows, batch_size, device)
    hidden, blocks = calls.hidden, adapter.blocks()
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", leave=False):
        placement.enter(i, blocks[i])
        args, kwargs = calls.args[i], calls.kwargs[i]
        hidden = [adapter.run_block(blocks[i], h, args[b], kwargs[b]) for b, h in enumerate(hidden)]
        placement.leave(i, blocks[i])
    del calls
    last = len(blocks) - 1
    for b, first in enumerate(range(0, windows.shape[0], batch_size)):
        ids = windows[first : first + batch_size].to(device)
        stubs = [lambda h, *_a, out=hidden[b], i=i, **_k: out if i == last else h for i in range(len(blocks))]
        with replaced_forwards(blocks, stubs):
            output = adapter.forward(ids)
        yield ids, output
