"""`shortgpt`: ShortGPT — remove whole blocks whose output barely differs from their input (Men et
al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", 2024).

A planning pass over the dense model measures each block's Block Influence on the calibration
tokens, BI = 1 − E_t[cos(h_in,t, h_out,t)], where h_in is the residual stream entering the block and
h_out the stream leaving it. `metric: angular` takes instead the angular distance
E_t[arccos(cos(h_in,t, h_out,t))] / π of Gromov et al. ("The Unreasonable Ineffectiveness of the
Deeper Layers", ICLR 2025). `selection: run` is Gromov et al.'s selection: the n blocks that go
are one run of consecutive blocks, the run ℓ..ℓ+n−1 whose input h_ℓ and output h_ℓ+n are closest
by the metric (n is what the budget or `blocks` asks); `tokens: last` reads only each window's
last token, as they do (a block's score is then the distance of the best run it belongs to). The
blocks with the lowest scores go, as many as the budget needs: `schedule=threshold` (the default)
removes every block scoring at or below one threshold, so each removal costs a whole block and the
achieved budget lands at or below the requested one in steps of one block. The result is the family's own
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
    angular = "angular"  # mean angular distance / π (Gromov et al.)


class Selection(str, Enum):
    each = "each"  # each block by its own score (ShortGPT)
    run = "run"  # one run of consecutive blocks, scored input to output (Gromov et al.)


class Tokens(str, Enum):
    all = "all"  # every calibration token (ShortGPT)
    last = "last"  # each window's last token (Gromov et al.)


@dataclass
class ShortGPTConf(MethodConf):
    name: str = "shortgpt"
    metric: LayerMetric = LayerMetric.bi
    selection: Selection = Selection.each
    tokens: Tokens = Tokens.all
    # ShortGPT's own knob: remove this many blocks (the budget becomes the share of the rest)
    blocks: int | None = None


def _last(streams: Streams) -> Streams:
    """Each window's last token: (windows, 1, hidden) per batch."""
    return [h[:, -1:] for h in streams]


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
    run_length = 0  # selection: run: how many consecutive blocks go (set by `prepare`)

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

    def prepare(self, contexts: list[BlockContext], inputs: PlanInputs) -> None:
        """`selection: run` needs the run's length before the planning pass: the fewest blocks
        whose removal meets the budget (or `blocks`), on a model whose blocks cost the same."""
        self.run_length = 0
        if Selection(self.cfg.selection) != Selection.run:
            return
        if inputs.schedule != "threshold":
            raise ShrinkError(
                f"method.selection=run removes one run of consecutive blocks, which schedule "
                f"{inputs.schedule!r} does not keep together; use schedule=threshold"
            )
        totals = [sum(sites.values()) for sites in inputs.costs.sites]
        if max(totals) - min(totals) > 1e-9 * max(totals):
            raise ShrinkError("method.selection=run needs blocks of equal cost and this model's differ")
        n = self._blocks = len(totals)
        self.run_length = math.ceil((1.0 - inputs.budget) * n - 1e-9)
        if not 1 <= self.run_length < n:
            raise ShrinkError(
                f"budget {inputs.budget:g} removes {self.run_length} of {n} blocks; a run needs 1 to {n - 1}"
            )
        self._inputs: dict[int, Streams] = {}
        self._runs: dict[int, float] = {}  # run start -> distance from its input to its output
        self._shapes: list[tuple[tuple[str, ...], float]] = []

    def profile(self, ctx: BlockContext) -> list[Curve]:
        """Two options per block: removed (free, scored by its influence) or kept whole. The error
        that `greedy`/`energy` read is the score itself. Under `selection: run` the scores are
        known once every run was measured, so the curves come with the last block."""
        assert ctx.outputs is not None, "the runner gives profiles the block's outputs"
        metric = LayerMetric(self.cfg.metric)
        last = Tokens(self.cfg.tokens) == Tokens.last
        inputs, outputs = (_last(ctx.hidden), _last(ctx.outputs)) if last else (ctx.hidden, ctx.outputs)
        if not self.run_length:
            return [self._curve(ctx.index, *self._whole(ctx), block_influence(inputs, outputs, metric))]
        n = self.run_length
        self._inputs[ctx.index] = inputs
        self._shapes.append(self._whole(ctx))
        start = ctx.index + 1 - n
        if start >= 0:  # the run start..index ends here: its input against this block's output
            self._runs[start] = block_influence(self._inputs.pop(start), outputs, metric)
        if ctx.index < self._blocks - 1:
            return []
        # a block's score: the distance of the best run it belongs to
        blocks = range(len(self._shapes))
        scores = [min(d for s, d in self._runs.items() if s <= i < s + n) for i in blocks]
        return [self._curve(i, *self._shapes[i], scores[i]) for i in blocks]

    @staticmethod
    def _curve(index: int, sites: tuple[str, ...], dense: float, score: float) -> Curve:
        options = [
            Option(0.0, score, {"remove": True, "score": score}, score=score),
            Option(dense, 0.0, {"remove": False, "score": score}),
        ]
        return Curve(index, "block", sites, dense, options)

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
