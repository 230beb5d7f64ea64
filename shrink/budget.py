"""Cost model of the compressible weights, and the Plan/Curve types schedules work with.

`budget` is the fraction of the block linears' cost that is kept; embeddings and the LM head are
not counted. Cost is `params` (weights + biases; a rank-r pair counts r·(m+n)) or `macs`
(multiply-accumulates per token; biases cost none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import BudgetUnit
from .models import Adapter, Site
from .surgery import LowRankLinear


@dataclass(frozen=True)
class Cost:
    params: int = 0
    macs: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)

    def of(self, unit: BudgetUnit | str) -> int:
        return self.params if BudgetUnit(unit) == BudgetUnit.params else self.macs


def module_cost(module: nn.Module) -> Cost:
    if isinstance(module, LowRankLinear):
        bias = module.second.bias.numel() if module.second.bias is not None else 0
        pair = module.rank * (module.in_features + module.out_features)
        return Cost(pair + bias, pair)
    if isinstance(module, nn.Linear):
        bias = module.bias.numel() if module.bias is not None else 0
        return Cost(module.weight.numel() + bias, module.weight.numel())
    raise TypeError(f"no cost model for {type(module).__name__}")


def attention_score_macs(adapter: Adapter, block: nn.Module, seq_len: int) -> int:
    """MACs per token of QKᵀ and attention×V: 2·heads·head_dim·(keys a query sees on average).

    A causal query at position t sees t keys, (L+1)/2 on average over a window of L tokens; an
    encoder query sees all L. Zero when seq_len is 0 (linears only).
    """
    if seq_len <= 0:
        return 0
    n_heads, _ = adapter.head_counts(block)
    head_dim = adapter.heads().head_dim
    return n_heads * head_dim * (seq_len + 1) if adapter.causal else 2 * n_heads * head_dim * seq_len


def site_cost(adapter: Adapter, block: nn.Module, site: Site, seq_len: int = 0) -> Cost:
    """The site's linears, plus the attention-score MACs on `attn_out` (they scale with the heads
    that o_proj reads, so pruning heads is what reduces them)."""
    total = Cost()
    for path in site.linears:
        total = total + module_cost(block.get_submodule(path))
    if site.name == "attn_out":
        total = total + Cost(0, attention_score_macs(adapter, block, seq_len))
    return total


def block_cost(adapter: Adapter, block: nn.Module, seq_len: int = 0) -> Cost:
    total = Cost()
    for site in adapter.sites(block):
        total = total + site_cost(adapter, block, site, seq_len)
    return total


def blocks_cost(adapter: Adapter, seq_len: int = 0) -> Cost:
    total = Cost()
    for block in adapter.blocks():
        total = total + block_cost(adapter, block, seq_len)
    return total


def largest_rank(
    in_features: int, out_features: int, bias: bool, fraction: float, unit: BudgetUnit
) -> int | None:
    """The largest rank whose factor pair costs at most `fraction` of the dense matrix.

    None when the target keeps everything (fraction ≥ 1) or when that rank is not cheaper than the
    dense matrix: the matrix stays dense.
    """
    if fraction >= 1.0:
        return None
    bias_cost = out_features if (bias and BudgetUnit(unit) == BudgetUnit.params) else 0
    dense = in_features * out_features + bias_cost
    allowed = fraction * dense - bias_cost
    rank = max(0, math.floor(allowed / (in_features + out_features) + 1e-9))
    if rank * (in_features + out_features) >= in_features * out_features:
        return None
    return rank


@dataclass
class Plan:
    """Per-block, per-site kept fraction of cost, resolved before compression starts.

    `choices` holds what a schedule decided in a method's own units (heads per KV group, neurons,
    ranks), keyed by block and by the name of the profile curve it came from; a method follows
    them where present, so fractions never have to be rounded back to units.
    """

    budget: float
    unit: BudgetUnit
    targets: dict[int, dict[str, float]] = field(default_factory=dict)
    choices: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def for_block(self, index: int) -> dict[str, float]:
        return self.targets[index]

    def choices_for(self, index: int) -> dict[str, dict[str, Any]]:
        return self.choices.get(index, {})

    def rows(self) -> list[dict]:
        rows = []
        for b, sites in self.targets.items():
            for s, f in sites.items():
                row = {"block": b, "site": s, "target": f}
                mine = {n: c for n, c in self.choices_for(b).items() if s in c.get("sites", ())}
                plain = [{k: v for k, v in c.items() if k != "sites"} for c in mine.values()]
                if len(mine) == 1:  # one unit spans the site (id): its choice inline
                    row.update(plain[0])
                elif mine:  # one unit per linear (low-rank): a choice per linear
                    row["choices"] = dict(zip(mine, plain, strict=True))
                rows.append(row)
        return rows


@dataclass(frozen=True)
class Option:
    """One way to compress a unit of a block: what it costs (in the budget unit) and its
    normalised calibration error (relative output error of the unit, 0 = exact)."""

    cost: float
    error: float
    choice: dict[str, Any]


@dataclass
class Curve:
    """The error-vs-cost options of one independently compressible unit of one block (a
    method's profile: the FFN neurons, the heads, one matrix's rank)."""

    block: int
    name: str
    sites: tuple[str, ...]
    dense_cost: float
    options: list[Option]


@dataclass
class PlanInputs:
    """What schedules may use besides the budget."""

    adapter: Adapter
    budget: float
    unit: BudgetUnit
    seq_len: int = 0  # attention-score MACs are counted at this context length (macs only)
    prunes_heads: bool = False  # the method removes heads, so attention-score MACs can shrink
    curves: list[Curve] | None = None  # error profiles, for schedules that need them
    min_keep: float = 0.0  # greedy: the least share of its dense cost any unit keeps
    k: int = 0  # last_k / first_k: how many blocks are compressed
