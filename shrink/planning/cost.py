"""The cost model: the one place that prices a linear, a rank-r pair, a neuron, a head / KV group.

Budgets count the block linears only (embeddings and the LM head are not compressed). Cost is
`params` (weights + biases; a rank-r pair counts r·(m+n)), `macs` (multiply-accumulates per
token; biases cost none, and attention scores QKᵀ and A·V count at `seq_len`, inside `attn_out`,
because they scale with the heads that o_proj reads) or `bytes` (what the checkpoint stores: a
weight at the model's dtype, or once quantized at `bits` plus its share of its group's scale and
zero point; a bias at the dtype). Schedules see only a `CostTable` of plain numbers; methods price
their options through the `CostModel` in their block context.

In `bytes`, what a method keeps is priced as it will be stored after the run's quantization step
(`weight_bytes`), while the budget is a fraction of the dense blocks as they are stored now:
`plan_budget` converts one into the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..config import BudgetUnit
from ..errors import ShrinkError
from ..models import Adapter, Attention, Site
from ..models.edits import CorrectedLinear, LowRankLinear
from ..quantization.packing import SCALE, ZERO, is_quantized, quantized_bits


@dataclass(frozen=True)
class Cost:
    params: int = 0
    macs: int = 0
    bytes: float = 0.0  # as stored (packed when quantized)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs, self.bytes + other.bytes)

    def of(self, unit: BudgetUnit | str) -> float:
        unit = BudgetUnit(unit)
        return (
            self.params if unit == BudgetUnit.params else self.macs if unit == BudgetUnit.macs else self.bytes
        )


@dataclass(frozen=True)
class CostTable:
    """Dense costs in the budget unit, per block: each site's cost and, inside `attn_out`, the
    attention-score MACs (0 in `params`), which only a method that drops heads can reduce."""

    unit: BudgetUnit
    sites: list[dict[str, float]]
    scores: list[float]

    @property
    def total(self) -> float:
        return sum(sum(b.values()) for b in self.sites)


@dataclass(frozen=True)
class NeuronCosts:
    """Cost of keeping k of an FFN's neurons: a neuron is one row of each input linear (and its
    bias) and one column of the output linear; the output bias is paid whatever k is, and a bias
    that a fold adds (`added`) once any neuron is dropped."""

    neurons: int
    per_neuron: float
    fixed: float
    added: float = 0

    def of(self, k: int) -> float:
        return k * self.per_neuron + self.fixed + (self.added if k < self.neurons else 0)


@dataclass(frozen=True)
class HeadCosts:
    """Cost of keeping m KV groups of q query heads whose values keep `width` and whose queries and
    keys keep `qk` of the `head_dim` dimensions: a query head costs its q rows (qk of them), its o
    columns (width) and its attention-score MACs in `macs` (QKᵀ and A·V at the wider of qk and
    width where the attention computes at thinned widths, `thin`; at head_dim where thinned heads
    are zero-padded); a KV head its k rows (qk) and v rows (width). Under MHA every group is one
    head."""

    n_heads: int
    n_kv: int
    head_dim: int
    q_row: float  # one row of q (with its bias entry)
    o_col: float  # one column of o
    score: float  # one query head's attention-score MACs at full widths (0 in params)
    kv_row: float  # one row of k or v
    fixed: float  # the output projection's bias
    added: float = 0  # a bias the fold adds to the output projection once anything is dropped
    thin: bool = False  # scores run at the kept widths

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv

    def of(self, m: int, q: int, width: int | None = None, qk: int | None = None) -> float:
        w = self.head_dim if width is None else width
        d = self.head_dim if qk is None else qk
        dropped = (m, q, w, d) != (self.n_kv, self.group, self.head_dim, self.head_dim)
        score = self.score * max(d, w) / self.head_dim if self.thin else self.score
        heads = m * q * (d * self.q_row + w * self.o_col + score)
        return heads + m * (d + w) * self.kv_row + self.fixed + (self.added if dropped else 0)

    def options(self) -> list[tuple[int, int]]:
        return [(m, q) for m in range(1, self.n_kv + 1) for q in range(1, self.group + 1)]

    def widths(self, step: int) -> list[int]:
        """Value widths a head may keep: multiples of `step`, and all of head_dim."""
        return sorted({*range(step, self.head_dim, step), self.head_dim})


def module_cost(module: nn.Module) -> Cost:
    """Every cost of a dense, factorised or corrected linear, bytes as stored."""
    if isinstance(module, LowRankLinear):
        return module_cost(module.first) + module_cost(module.second)
    if isinstance(module, CorrectedLinear):
        return module_cost(module.base) + module_cost(module.correction)
    if isinstance(module, nn.Linear):
        weight, bias = module.weight, module.bias
        bias_bytes = bias.numel() * bias.element_size() if bias is not None else 0
        n_bias = bias.numel() if bias is not None else 0
        return Cost(weight.numel() + n_bias, weight.numel(), weight_bytes(module) + bias_bytes)
    raise TypeError(f"no cost model for {type(module).__name__}")


def weight_bytes(linear: nn.Linear) -> float:
    """What a plain linear's weight takes in the checkpoint: its dtype, or once packed its bits per
    weight plus the grid's scales and zero points (shapes only: it may be on the meta device)."""
    weight = linear.weight
    if not is_quantized(linear):
        return weight.numel() * weight.element_size()
    bits = quantized_bits(linear)
    grid = sum(
        t.numel() * (t.element_size() if n == SCALE else bits / 8)
        for n, t in linear.named_buffers(recurse=False)
        if n in (SCALE, ZERO)
    )
    return weight.numel() * bits / 8 + grid


class CostModel:
    """Prices in one budget unit, for one model family and one attention context length (the
    prices of single linears, ranks and units need no adapter)."""

    def __init__(
        self,
        adapter: Adapter | None,
        unit: BudgetUnit | str = BudgetUnit.params,
        seq_len: int = 0,
        weight_bytes: float = 4.0,
        bias_bytes: float = 4.0,
        correction_rank: int = 0,
    ) -> None:
        """`weight_bytes`: what one kept weight will be stored in (the dtype's size, or a quantized
        weight's bits and group share / 8); `bias_bytes`: the dtype's size (used in `bytes` only).
        `correction_rank`: the rank of the quantization step's low-rank corrections, which the
        plan reserves budget for."""
        self.adapter, self.unit, self.seq_len = adapter, BudgetUnit(unit), seq_len
        self.weight_bytes, self.bias_bytes = weight_bytes, bias_bytes
        self.correction_rank = correction_rank

    @property
    def _weight(self) -> float:
        """One weight in the unit."""
        return self.weight_bytes if self.unit == BudgetUnit.bytes else 1

    @property
    def _bias_entry(self) -> float:
        """One bias entry in the unit (MACs: none)."""
        return {BudgetUnit.params: 1, BudgetUnit.macs: 0}.get(self.unit, self.bias_bytes)

    # ---- whole modules, sites, blocks (both units: records report params and MACs) --------------
    def scores(self, attention: Attention) -> Cost:
        """QKᵀ and A·V per token: 2·heads·width·(keys a query sees on average), at the head size
        the attention computes at (`Attention.score_width`). A causal query at position t sees t
        keys, (L+1)/2 on average over L tokens; an encoder query sees all L."""
        if self.seq_len <= 0:
            return Cost()
        n_heads, _ = attention.counts()
        width = n_heads * attention.score_width()
        return Cost(0, width * (self.seq_len + 1) if attention.causal else 2 * width * self.seq_len)

    def site(self, block: nn.Module, site: Site) -> Cost:
        total = Cost()
        for path in site.linears:
            total = total + module_cost(block.get_submodule(path))
        if site.name == "attn_out":
            total = total + self.scores(self.adapter.attention(block))
        return total

    def block(self, block: nn.Module) -> Cost:
        """The block's sites and the residual-stream maps a method added to it (SliceGPT's
        shortcut matrices), which it pays for like any other weight."""
        total = Cost()
        for site in self.adapter.sites(block):
            total = total + self.site(block, site)
        for path in self.adapter.stream_maps(block):
            total = total + module_cost(block.get_submodule(path))
        return total

    def model(self) -> Cost:
        total = Cost()
        for block in self.adapter.blocks():
            total = total + self.block(block)
        return total

    def price(self, block: nn.Module, site: Site) -> float:
        """The site's cost in the budget unit, its linears priced as they will be stored."""
        if self.unit != BudgetUnit.bytes:
            return self.site(block, site).of(self.unit)
        return sum(self.planned(block.get_submodule(path)) for path in site.linears)

    def planned(self, module: nn.Module) -> float:
        """A linear (or pair) in the budget unit as it will be stored after the run's steps."""
        if self.unit != BudgetUnit.bytes:
            return module_cost(module).of(self.unit)
        linears = [module.first, module.second] if isinstance(module, LowRankLinear) else [module]
        return sum(
            lin.weight.numel() * self._weight
            + (lin.out_features * self._bias_entry if lin.bias is not None else 0)
            for lin in linears
        )

    def plan_budget(self, budget: float) -> float:
        """The budget as a fraction of the table's total. In `bytes` the dense blocks are stored at
        their dtype but priced as they will be stored (quantized), so the fraction grows by their
        ratio (capped at 1: keep everything). Low-rank corrections of the quantization step are
        reserved first, at the dense widths (an upper bound of what they cost on kept widths)."""
        planned, stored, reserve = self._budget_terms()
        if reserve >= budget * stored:
            raise ShrinkError(
                f"quant.lowrank={self.correction_rank}: the corrections alone cost {reserve / stored:.3f} "
                f"of the blocks, above budget {budget:g}; lower the rank or raise the budget"
            )
        return min(1.0, (budget * stored - reserve) / planned)

    def budget_of(self, fraction: float) -> float:
        """The budget whose plan keeps `fraction` of the table (`plan_budget`'s inverse below 1)."""
        planned, stored, reserve = self._budget_terms()
        return (fraction * planned + reserve) / stored

    def _budget_terms(self) -> tuple[float, float, float]:
        """The blocks priced as planned and as stored, and the corrections' reserve."""
        blocks = self.adapter.blocks()
        planned = sum(self.price(block, site) for block in blocks for site in self.adapter.sites(block))
        stored = self.model().of(self.unit) if self.unit == BudgetUnit.bytes else planned
        reserve = self.correction_rank * sum(
            (linear.in_features + linear.out_features)
            * (self.bias_bytes if self.unit == BudgetUnit.bytes else 1)
            for block in blocks
            for site in self.adapter.sites(block)
            for linear in (block.get_submodule(path) for path in site.linears)
        )
        return planned, stored, reserve

    def table(self) -> CostTable:
        sites, scores = [], []
        for block in self.adapter.blocks():
            sites.append({s.name: self.price(block, s) for s in self.adapter.sites(block)})
            scores.append(self.scores(self.adapter.attention(block)).of(self.unit))
        return CostTable(self.unit, sites, scores)

    def shaped(self, in_features: int, out_features: int, bias: bool, quantized: bool = True) -> float:
        """A plain out×in linear of a shape a method will give it, in the budget unit; `quantized`:
        stored as the run's quantization step will store it (a site's linear), else at the dtype."""
        weight = self._weight if quantized else (self.bias_bytes if self.unit == BudgetUnit.bytes else 1)
        return in_features * out_features * weight + (out_features * self._bias_entry if bias else 0)

    # ---- units a method keeps or drops ------------------------------------------------------------
    def _bias(self, linear: nn.Linear, bias: bool | None = None) -> int:
        """What the linear's bias costs (params only); `bias` overrides whether it has one."""
        has = linear.bias is not None if bias is None else bias
        return linear.out_features * self._bias_entry if has else 0

    def rank_pair(self, linear: nn.Linear, rank: int, bias: bool) -> float:
        return rank * (linear.in_features + linear.out_features) * self._weight + self._bias(linear, bias)

    @staticmethod
    def max_rank(linear: nn.Linear) -> int:
        """The largest rank whose pair has fewer weights than the dense matrix: r(m+n) < mn."""
        m, n = linear.out_features, linear.in_features
        return max(0, -(-m * n // (m + n)) - 1)

    def largest_rank(self, linear: nn.Linear, bias: bool, fraction: float) -> int | None:
        """The largest rank whose pair costs at most `fraction` of the dense matrix; None when the
        target keeps everything or that rank is not cheaper than dense (the matrix stays dense)."""
        if fraction >= 1.0:
            return None
        m, n = linear.out_features, linear.in_features
        bias_cost = self._bias(linear, bias)
        allowed = fraction * (m * n * self._weight + bias_cost) - bias_cost
        rank = max(0, math.floor(allowed / ((m + n) * self._weight) + 1e-9))
        return None if rank * (m + n) >= m * n else rank

    def _row(self, linear: nn.Linear) -> float:
        """One output row of a linear, with its bias entry."""
        return linear.in_features * self._weight + self._bias(linear) / max(linear.out_features, 1)

    def _added(self, out: nn.Linear, adds_bias: bool) -> int:
        """A bias a fold gives `out` where it has none."""
        return self._bias(out, True) if adds_bias and out.bias is None else 0

    def neurons(self, ins: list[nn.Linear], out: nn.Linear, adds_bias: bool = False) -> NeuronCosts:
        per = sum(self._row(lin) for lin in ins) + out.out_features * self._weight
        return NeuronCosts(out.in_features, per, self._bias(out), self._added(out, adds_bias))

    def heads(self, attention: Attention, adds_bias: bool = False) -> HeadCosts:
        q, k, o = (attention.linear(n) for n in "qko")
        n_heads, n_kv = attention.counts()
        full_width = attention.head_dim / attention.score_width()  # one head's score at head_dim
        score = self.scores(attention).of(self.unit) * full_width / n_heads
        return HeadCosts(
            n_heads,
            n_kv,
            attention.head_dim,
            self._row(q),
            o.out_features * self._weight,
            score,
            self._row(k),
            self._bias(o),
            self._added(o, adds_bias),
            thin=attention.module is not None,
        )
