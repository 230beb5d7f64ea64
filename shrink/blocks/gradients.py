"""The gradient pass: what a first-order (Taylor) pruner reads, from backward passes of the
calibration loss through the whole dense model, before any block is edited.

A Taylor pruner (LLM-Pruner) scores a structure by how much the calibration loss changes, to first
order, when its weights go to zero: the salience s = W ⊙ ∂L/∂W summed over the structure's
weights. That is a property of the model's loss, not of one block's statistics, so the whole model
runs forward and backward (no `stream`), and every block linear's gradient is held at once: four
bytes per block weight (float32 gradients) beside one batch's activations. Each linear's salience
is reduced at once to sums over its rows and over its columns, which is all a structured pruner
reads (a neuron or head is whole rows of the linears that write it and whole columns of the one
that reads it), so a method sees only its own block's vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NumericalError, ShrinkError
from ..models import Adapter

log = logging.getLogger("shrink")


@dataclass(frozen=True)
class Saliences:
    """Sums of one linear's salience s = W ⊙ ∂L/∂W (float64): of |s| and of s, per output row and
    per input column."""

    rows_abs: torch.Tensor
    cols_abs: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, grad: torch.Tensor) -> Saliences:
        s = weight.detach().to(torch.float64) * grad.to(torch.float64)
        return cls(s.abs().sum(1).cpu(), s.abs().sum(0).cpu(), s.sum(1).cpu(), s.sum(0).cpu())


BlockSaliences = dict[str, Saliences]  # linear path in the block -> its saliences


def block_linears(adapter: Adapter, block: torch.nn.Module) -> list[str]:
    return [path for site in adapter.sites(block) for path in site.linears]


def gradient_bytes(adapter: Adapter) -> int:
    """What the block linears' float32 gradients take (the pass's memory beside activations)."""
    return 4 * sum(
        block.get_submodule(path).weight.numel()
        for block in adapter.blocks()
        for path in block_linears(adapter, block)
    )


def taylor_saliences(
    adapter: Adapter, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[BlockSaliences]:
    """Per block, the saliences of its linears under the gradient of the mean next-token loss over
    all calibration windows (batches weighted by their windows, so the gradient is the one of the
    whole set at once, whatever `batch_size`). Only block linears take gradients; the model's own
    `requires_grad` flags and its train/eval mode are restored afterwards."""
    if not adapter.causal:
        raise ShrinkError(
            f"the gradient pass needs a next-token loss; model family {adapter.family!r} is an encoder"
        )
    model = adapter.model
    blocks = adapter.blocks()
    weights = {(i, path): block.get_submodule(path).weight for i, block in enumerate(blocks)
               for path in block_linears(adapter, block)}  # fmt: skip
    log.info("gradient pass: %d windows; the block linears' gradients take %.0f MiB",
             windows.shape[0], gradient_bytes(adapter) / 2**20)  # fmt: skip
    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    n = windows.shape[0]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        with torch.enable_grad():
            for start in tqdm(range(0, n, batch_size), desc="gradients", unit="batch", leave=False):
                ids = windows[start : start + batch_size].to(device)
                logits = adapter.forward(ids).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                if not torch.isfinite(loss):
                    raise NumericalError(f"the gradient pass's calibration loss is {float(loss)}")
                (loss * (ids.shape[0] / n)).backward()
        out: list[BlockSaliences] = [{} for _ in blocks]
        for (i, path), w in weights.items():
            if w.grad is None or not torch.isfinite(w.grad).all():
                raise NumericalError(f"block {i} {path}: the calibration loss's gradient is not finite")
            out[i][path] = Saliences.of(w, w.grad)
        return out
    finally:
        for w in weights.values():
            w.grad = None
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)
