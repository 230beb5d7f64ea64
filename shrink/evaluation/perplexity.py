"""Perplexity by the papers' protocol: non-overlapping windows of the joined test text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, desc: str = "ppl"
) -> dict:
    """exp(mean next-token NLL) over every predicted token of every window.

    Log-probabilities are computed in float32 whatever the model's dtype.
    """
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": total_tokens}
