"""`wanda-sp`: structured Wanda, as FLAP's authors define it for their comparison (An et al., AAAI
2024, reference code github.com/CASIA-IVA-Lab/FLAP, `lib/prune.py: prune_wanda_sp`; Wanda's
score from Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR
2024).

Wanda's score of a weight is |W_ij| · ‖x_j‖ (its magnitude times its input's norm over the
calibration tokens). Structured, the scores of o_proj and down_proj are averaged over each input
channel's column: a neuron's score is its channel's, a head's the sum over its channels, and under
grouped-query attention a KV group's the sum over its heads (the reference prunes heads of
multi-head models only; the KV group is the unit a GQA model allows). No bias compensation.
Allocation: uniform per block (the reference's only one, the default); the profile's options
also serve `schedule=threshold|greedy`, with raw, unstandardised scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks.context import BlockContext
from ..config import MethodConf
from . import register
from .scored import BlockScores, ScoredPruner, UnitScores, channel_moments


@dataclass
class WandaSPConf(MethodConf):
    name: str = "wanda-sp"


def wanda_channels(weight: torch.Tensor, stats) -> torch.Tensor:
    """Per input channel: mean over output rows of |W_ij| · √E[x_j²] (float64)."""
    _, square = channel_moments(stats)
    return weight.detach().to(torch.float64).abs().mean(0) * square.sqrt()


@register("wanda-sp", WandaSPConf)
class WandaSP(ScoredPruner):
    def block_scores(self, ctx: BlockContext) -> BlockScores:
        attention = ctx.attention
        n_heads, n_kv = attention.counts()
        o = attention.linear("o")
        down = ctx.block.get_submodule(ctx.site("mlp_out").linears[0])
        attn = wanda_channels(o.weight, ctx.stats["attn_out"]).reshape(n_kv, -1).sum(1)
        mlp = wanda_channels(down.weight, ctx.stats["mlp_out"])
        return BlockScores(UnitScores(attn, attn), UnitScores(mlp, mlp))
