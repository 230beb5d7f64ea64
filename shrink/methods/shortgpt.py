"""`shortgpt`: ShortGPT — remove whole blocks whose output barely differs from their input (Men et
al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", 2024).

A planning pass over the dense model measures each block's Block Influence on the calibration
tokens, BI = 1 − E_t[cos(h_in,t, h_out,t)], where h_in is the residual stream entering the block and
h_out the stream leaving it. `metric: angular` takes instead the angular distance
E_t[arccos(cos(h_in,t, h_out,t))] / π of Gromov et al. ("The Unreasonable Ineffectiveness of the
Deeper Layers", 2024) for one block at a time. Gromov et al. choose a run of n consecutive blocks
by the distance across the whole run; that selection is not implemented here. The blocks with the
lowest scores go, as many as the budget needs: `schedule=threshold` (the default) removes every
block scoring at or below one threshold, so each removal costs a whole block and the achieved budget
lands at or below the requested one in steps of one block. The result is the family's own
architecture with fewer layers, saved as a stock transformers checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import Enum

import torch

from ..blocks.context import BlockContext, BlockResult, Streams
from ..config import MethodConf
from ..errors import ShrinkError
from ..linalg.moments import SecondMoment
from ..models import Site
from ..planning.budget import Curve, Option, PlanInputs, Sizes
from . import register
from .base import Method


class LayerMetric(str, Enum):
    bi = "bi"  # Block Influence, 1 − mean cosine (ShortGPT)
    angular = "angular"  # mean angular distance / π (Gromov et al., one block at a time)


@dataclass
class ShortGPTConf(MethodConf):
    name: str = "shortgpt"
    metric: LayerMetric = LayerMetric.bi
    # ShortGPT's own knob: remove this many blocks (the budget becomes the share of the rest)
    blocks: int | None = None


def block_influence(inputs: Streams, outputs: Streams, metric: LayerMetric) -> float:
    """The block's score over every calibration token: 1 − mean cos(h_in, h_out) (`bi`), or the
    mean of arccos(cos)/π (`angular`); float64, so a block close to the identity scores near 0."""
    total, count = 0.0, 0
    for h_in, h_out in zip(inputs, outputs, strict=True):
        a, b = h_in.to(torch.float64).flatten(0, -2), h_out.to(torch.float64).flatten(0, -2)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30).clamp(-1.0, 1.0)
        total += float((1.0 - cos).sum() if metric == LayerMetric.bi else (torch.arccos(cos) / math.pi).sum())
        count += cos.numel()
    if count == 0:
        raise ShrinkError("no calibration tokens reached the block")
    return total / count


@register("shortgpt", ShortGPTConf)
class ShortGPT(Method):
    has_profile = True
    scores_units = True
    removes_blocks = True

    def new_stats(
        self, site: Site, dim: int, device: torch.device, where: str, seed: int
    ) -> SecondMoment | None:
        """Nothing inside the block is read: only its inputs and outputs."""
        return None

    @property
    def prunes_heads(self) -> bool:
        return True  # a removed block takes its attention scores with it

    def _whole(self, ctx: BlockContext) -> tuple[tuple[str, ...], float]:
        sites = tuple(s.name for s in ctx.sites)
        return sites, ctx.price(*sites)

    knob = "blocks"

    def native_budget(self, contexts: list[BlockContext], inputs: PlanInputs) -> float | None:
        """Removing `blocks` of the model's n equal blocks keeps (n − blocks) / n of them."""
        n, removed = len(contexts), self.cfg.blocks
        if not 1 <= removed < n:
            raise ShrinkError(f"method.blocks={removed} must lie in [1, {n - 1}]: the model has {n} blocks")
        totals = [sum(sites.values()) for sites in inputs.costs.sites]
        if max(totals) - min(totals) > 1e-9 * max(totals):
            raise ShrinkError("method.blocks needs blocks of equal cost and this model's differ; set budget")
        return (n - removed) / n

    def sizes(self, ctx: BlockContext) -> list[Sizes]:
        sites, dense = self._whole(ctx)
        return [Sizes(ctx.index, "block", sites, dense, (0.0, dense))]

    def profile(self, ctx: BlockContext) -> list[Curve]:
        """Two options per block: removed (free, scored by its influence) or kept whole. The error
        that `greedy`/`energy` read is the score itself."""
        assert ctx.outputs is not None, "the runner gives profiles the block's outputs"
        score = block_influence(ctx.hidden, ctx.outputs, LayerMetric(self.cfg.metric))
        sites, dense = self._whole(ctx)
        options = [
            Option(0.0, score, {"remove": True, "score": score}, score=score),
            Option(dense, 0.0, {"remove": False, "score": score}),
        ]
        return [Curve(ctx.index, "block", sites, dense, options)]

    def compress_block(self, ctx: BlockContext) -> BlockResult:
        start = time.perf_counter()
        choice = ctx.choices.get("block")
        if choice is None:
            raise ShrinkError(
                f"block {ctx.index}: shortgpt removes blocks a planning pass chose; use schedule=threshold"
            )
        sites, dense = self._whole(ctx)
        ctx.removed = bool(choice["remove"])
        macs = sum(ctx.costs.site(ctx.block, s).macs for s in ctx.sites)
        params = sum(ctx.costs.site(ctx.block, s).params for s in ctx.sites)
        record = {
            "site": "block",
            "kept": 0 if ctx.removed else 1,
            "total": 1,
            "params_dense": params,
            "params_kept": 0 if ctx.removed else params,
            "macs_dense": macs,
            "macs_kept": 0 if ctx.removed else macs,
            "target": sum(ctx.targets[s] * ctx.price(s) for s in sites) / dense,
            "rel_error": None,
            "score": float(choice["score"]),
            "removed": ctx.removed,
            "seconds": time.perf_counter() - start,
        }
        return BlockResult([record], {})
