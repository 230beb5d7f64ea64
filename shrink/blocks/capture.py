"""Catching what the model passes its blocks, and running a model block by block.

Block inputs are caught by replacing every block's forward with a stub that records what the model
passes it (hidden states, masks, position embeddings: per block, since some architectures give
different blocks different masks) and hands the hidden states on unchanged, so no block computes.
The runner (`runner.py`) then walks the blocks from those inputs; `forward_by_blocks` gives a
model's outputs with its blocks brought in one at a time (`stream=true` evaluation).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import Adapter
from .placement import Placement


class _StopForward(Exception):
    pass


@dataclass
class Calls:
    """What one block receives for every calibration batch."""

    hidden: list[torch.Tensor]
    args: list[list[tuple[Any, ...]]]  # [block][batch]
    kwargs: list[list[dict[str, Any]]]  # [block][batch]


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
    or the wrapper that accelerate's hooks put on the instance (device-mapped models). The block's
    own forward hooks are silenced meanwhile (a sliced block's hooks route its residual stream and
    would hand the stub another input than the model's)."""
    saved = [block.__dict__.get("forward") for block in blocks]
    hooks = [(block._forward_pre_hooks, block._forward_hooks) for block in blocks]
    for block, forward in zip(blocks, forwards, strict=True):
        block.forward = forward
        block._forward_pre_hooks, block._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for block, forward, (pre, post) in zip(blocks, saved, hooks, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
            block._forward_pre_hooks, block._forward_hooks = pre, post


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
