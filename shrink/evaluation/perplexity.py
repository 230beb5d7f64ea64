"""Perplexity by the papers' protocol: non-overlapping windows of the joined test text."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..blocks.capture import forward_by_blocks
from ..blocks.placement import Placement
from ..models import build_adapter


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, desc: str = "ppl"
) -> dict:
    """exp(mean next-token NLL) over every predicted token of every window.

    Log-probabilities are computed in float32 whatever the model's dtype.
    """

    def outputs() -> Iterable[tuple[torch.Tensor, Any]]:
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
            ids = windows[start : start + batch_size].to(device)
            yield ids, model(input_ids=ids, use_cache=False)

    return perplexity_of(outputs())


def perplexity_by_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    placement: Placement,
    desc: str = "ppl",
) -> dict:
    """`perplexity` for `stream=true`: the same batches, computed block by block with each block
    brought in from `placement`'s store (capture.forward_by_blocks), so the number is the same."""
    adapter = build_adapter(model)
    return perplexity_of(forward_by_blocks(adapter, windows, batch_size, device, placement, desc))


def perplexity_of(outputs: Iterable[tuple[torch.Tensor, Any]]) -> dict:
    total_nll, total_tokens = 0.0, 0
    for ids, out in outputs:
        logits = out.logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": total_tokens}
