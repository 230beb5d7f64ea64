"""Pruning by unit scores: the structured pruners of the field that rank FFN neurons and attention
heads by a score read from calibration statistics and weights, and remove the lowest.

FLAP and Wanda-sp differ only in the score (and FLAP's bias compensation), so the selection,
pricing, edits and profiles live here. The units are those of `id`: an FFN neuron (a row of each
input linear and a column of the output linear) and, under grouped-query attention, a whole KV
group (its k and v rows and all of its query heads' q rows and o columns), because a KV head
cannot go while query heads still read it; under multi-head attention a group is one head.
A block keeps at least one KV group and one neuron.

Plans: under a fixed schedule (`uniform`: each block at the budget, FLAP's UL-UM) the heads lose
⌊(1 − share)·n⌋ of their n KV groups, as the reference code counts them, and the FFN gets what the
block's allowance leaves, so the block meets its target as closely as the units allow. Under
`schedule=threshold` (FLAP's AL-AM) the profile's options carry each option's highest removed
score, compared across blocks; under `greedy`/`energy` their error is the removed share of the
score's mass.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from dataclasses import dataclass

import torch

from ..blocks.context import BlockContext, BlockResult
from ..errors import ShrinkError
from ..linalg.decompositions import fold_error
from ..linalg.moments import SecondMoment
from ..models import Site
from ..models.edits import keep_outputs, set_inputs
from ..planning.budget import Curve, Option, Sizes
from ..planning.cost import HeadCosts, NeuronCosts, module_cost
from .base import Method
from .units import ffn_costs, neuron_sizes, site_fraction, unit_record


@dataclass(frozen=True)
class UnitScores:
    """One kind of unit of one block: `score` orders the units (higher is kept first; what
    `schedule=threshold` compares across blocks) and `mass` (≥ 0) is each unit's share of what
    removing it loses, whose removed fraction is the option's error for error-driven schedules."""

    score: torch.Tensor
    mass: torch.Tensor

    def kept(self, k: int) -> torch.Tensor:
        """The k best units, in index order (ties go to the lower index, as a stable sort)."""
        order = torch.sort(self.score, descending=True, stable=True).indices
        return order[:k].sort().values

    def options(self, sizes: list[int], price) -> list[Option]:
        """Keeping each of `sizes` best units: its price, the removed share of the mass (square
        root, as a relative error), and the highest removed score."""
        ordered = torch.sort(self.score, descending=True, stable=True)
        mass = self.mass[ordered.indices].clamp_min(0)
        total = float(mass.sum()) or 1.0
        left = torch.flip(torch.cumsum(torch.flip(mass, [0]), 0), [0])  # mass from position k on
        options = []
        for k in sizes:
            n = len(self.score)
            removed = float(left[k]) if k < n else 0.0
            score = float(ordered.values[k]) if k < n else None
            options.append(Option(price(k), (removed / total) ** 0.5, {"units": k}, score=score))
        return options


@dataclass(frozen=True)
class BlockScores:
    groups: UnitScores  # one entry per KV group (per head under multi-head attention)
    neurons: UnitScores  # one entry per FFN neuron


class ScoredPruner(Method):
    """A method that scores neurons and KV groups (`block_scores`) and keeps the best."""

    has_profile = True
    scores_units = True

    @property
    def adds_bias(self) -> bool:
        """Whether removed units' mean output is carried into a bias of o_proj / down_proj."""
        return False

    @property
    def prunes_heads(self) -> bool:
        return True

    def new_stats(
        self, site: Site, dim: int, device: torch.device, where: str, seed: int
    ) -> SecondMoment | None:
        """Only the inputs of o_proj and down_proj are scored."""
        if site.name not in ("attn_out", "mlp_out"):
            return None
        return SecondMoment(dim, device=device, where=where, seed=seed, batch_dtype=torch.float32)

    @abstractmethod
    def block_scores(self, ctx: BlockContext) -> BlockScores:
        """The scores of the block's KV groups and neurons, from `ctx.stats` and its weights."""

    # ---- sizes and prices ---------------------------------------------------------------------
    def _head_costs(self, ctx: BlockContext) -> HeadCosts:
        return ctx.costs.heads(ctx.attention, self.adds_bias)

    def _group_sizes(self, ctx: BlockContext, costs: HeadCosts) -> list[int]:
        """KV groups a block may keep: o_proj's inputs in whole multiples of the width multiple."""
        width = costs.group * costs.head_dim
        return [m for m in range(1, costs.n_kv + 1) if (m * width) % self.width_multiple == 0]

    def sizes(self, ctx: BlockContext) -> list[Sizes]:
        heads = self._head_costs(ctx)
        ffn = ffn_costs(ctx, self.adds_bias)
        return [
            Sizes(
                ctx.index, "attn", ("attn_in", "attn_out"), ctx.price("attn_in", "attn_out"),
                tuple(heads.of(m, heads.group) for m in self._group_sizes(ctx, heads)),
            ),
            Sizes(
                ctx.index, "mlp", ("mlp_in", "mlp_out"), ctx.price("mlp_in", "mlp_out"),
                tuple(ffn.of(k) for k in neuron_sizes(ffn.neurons, self.width_multiple)),
            ),
        ]  # fmt: skip

    def profile(self, ctx: BlockContext) -> list[Curve]:
        scores = self.block_scores(ctx)
        heads = self._head_costs(ctx)
        ffn = ffn_costs(ctx, self.adds_bias)
        attn = scores.groups.options(self._group_sizes(ctx, heads), lambda m: heads.of(m, heads.group))
        mlp = scores.neurons.options(neuron_sizes(ffn.neurons, self.width_multiple), ffn.of)
        return [
            Curve(ctx.index, "attn", ("attn_in", "attn_out"), ctx.price("attn_in", "attn_out"),
                  [_as(o, kv_groups=o.choice["units"], heads_per_group=heads.group) for o in attn]),
            Curve(ctx.index, "mlp", ("mlp_in", "mlp_out"), ctx.price("mlp_in", "mlp_out"),
                  [_as(o, neurons=o.choice["units"]) for o in mlp]),
        ]  # fmt: skip

    # ---- compression --------------------------------------------------------------------------
    def compress_block(self, ctx: BlockContext) -> BlockResult:
        """Heads first, then neurons, each keeping its best-scored units (scores read before any
        edit, as the reference implementations do); the FFN gets what the heads leave."""
        scores = self.block_scores(ctx)
        allowance = sum(ctx.targets[s.name] * ctx.price(s.name) for s in ctx.sites)
        dense = ctx.price(*(s.name for s in ctx.sites))
        records = [self._prune_heads(ctx, scores.groups, site_fraction(ctx, ("attn_in", "attn_out")))]
        ffn_share = (allowance - ctx.price("attn_in", "attn_out")) / ctx.price("mlp_in", "mlp_out")
        records.append(self._prune_ffn(ctx, scores.neurons, ffn_share))
        kept = ctx.price(*(s.name for s in ctx.sites))
        if kept > allowance + 1e-6 * dense:
            raise ShrinkError(
                f"block {ctx.index}: {self.name} keeps {kept / dense:.3f} of the block, over its target "
                f"{allowance / dense:.3f} (at least one KV group and one neuron stay); raise the budget"
            )
        return BlockResult(records, {})

    def _kept_groups(self, ctx: BlockContext, costs: HeadCosts, fraction: float) -> int:
        """The schedule's choice, else the reference implementations' count: ⌊(1 − fraction)·n⌋ of
        the n KV groups go (the heads round towards keeping, and the FFN pays the excess so that
        the block still meets its target), at least one stays."""
        if "attn" in ctx.choices:
            return int(ctx.choices["attn"]["kv_groups"])
        n = costs.n_kv
        wanted = max(1, n - math.floor((1.0 - fraction) * n + 1e-9))
        sizes = self._group_sizes(ctx, costs)
        return min((m for m in sizes if m >= wanted), default=max(sizes))

    def _prune_heads(self, ctx: BlockContext, scores: UnitScores, fraction: float) -> dict:
        start = time.perf_counter()
        attention = ctx.attention
        paths = [attention.paths.q, attention.paths.k, attention.paths.v, attention.paths.o]
        before = [module_cost(ctx.block.get_submodule(p)) for p in paths]
        costs = self._head_costs(ctx)
        n_heads, n_kv = attention.counts()
        group, dh = n_heads // n_kv, attention.head_dim
        m = self._kept_groups(ctx, costs, fraction)
        error = 0.0
        if m < n_kv:
            groups = scores.kept(m)
            o = attention.linear("o")
            device = o.weight.device
            kv_rows = _spans(groups, dh).to(device)
            heads = torch.cat([g * group + torch.arange(group) for g in groups.tolist()])
            q_rows = _spans(heads, dh).to(device)
            new_o, bias, error = self._drop_inputs(o, ctx.stats["attn_out"], q_rows)
            keep_outputs(ctx.block, attention.paths.q, q_rows)
            keep_outputs(ctx.block, attention.paths.k, kv_rows)
            keep_outputs(ctx.block, attention.paths.v, kv_rows)
            set_inputs(ctx.block, attention.paths.o, new_o, bias)
            attention.set_counts(m * group, m)
        return unit_record(ctx, "attn", m * group, n_heads, before, paths, fraction, error, start, kept_kv=m)

    def _prune_ffn(self, ctx: BlockContext, scores: UnitScores, fraction: float) -> dict:
        start = time.perf_counter()
        site_in, site_out = ctx.site("mlp_in"), ctx.site("mlp_out")
        paths = [*site_in.linears, site_out.linears[0]]
        before = [module_cost(ctx.block.get_submodule(p)) for p in paths]
        costs: NeuronCosts = ffn_costs(ctx, self.adds_bias)
        n = costs.neurons
        if "mlp" in ctx.choices:
            k = int(ctx.choices["mlp"]["neurons"])
        else:
            allowed = fraction * costs.of(n)
            k = n
            if allowed < costs.of(n):
                k = int((allowed - costs.fixed - costs.added) // costs.per_neuron)
                k -= k % self.width_multiple
        if k < 1:
            raise ShrinkError(
                f"block {ctx.index}: after the heads, the FFN's share ({fraction:.4f}) cannot keep even one "
                "neuron; raise the budget"
            )
        error = 0.0
        if k < n:
            down = ctx.block.get_submodule(site_out.linears[0])
            keep = scores.kept(k).to(down.weight.device)
            new_down, bias, error = self._drop_inputs(down, ctx.stats[site_out.name], keep)
            for path in site_in.linears:
                keep_outputs(ctx.block, path, keep)
            set_inputs(ctx.block, site_out.linears[0], new_down, bias)
        return unit_record(ctx, "mlp", k, n, before, paths, fraction, error, start)

    def _drop_inputs(self, linear, stats: SecondMoment, keep: torch.Tensor):
        """(weight on the kept inputs, new bias or None, relative output error). With bias
        compensation the removed inputs' calibration mean times their columns joins the bias."""
        w = linear.weight.detach().to(torch.float64)
        shift = None
        bias = None
        if self.adds_bias:
            shift = stats.mean().clone()
            shift[keep] = 0
            old = linear.bias.detach().to(torch.float64) if linear.bias is not None else 0.0
            bias = old + w @ shift
        return w[:, keep], bias, fold_error(w, w[:, keep], keep, shift, stats)


def _spans(units: torch.Tensor, width: int) -> torch.Tensor:
    """The rows of `units` (indices) when each unit spans `width` consecutive rows."""
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _as(option: Option, **choice) -> Option:
    return Option(option.cost, option.error, choice, score=option.score)


def standardised(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over one layer's channels (FLAP's per-layer standardisation)."""
    return (x - x.mean()) / x.std()


def channel_moments(stats: SecondMoment) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input channel: the calibration mean and mean square (float64)."""
    if stats.count == 0:
        raise ShrinkError(f"{stats.where}: no calibration tokens reached this layer")
    return stats.mean(), torch.diagonal(stats.xtx) / stats.count
