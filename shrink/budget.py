"""Cost model of the compressible weights and schedules that turn a global budget into targets.

`budget` is the fraction of the block linears' cost that is kept; embeddings and the LM head are
not counted. Cost is `params` (weights + biases; a rank-r pair counts r·(m+n)) or `macs`
(multiply-accumulates per token; biases cost none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .config import BudgetUnit
from .errors import ShrinkError
from .models import Adapter
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


def block_cost(adapter: Adapter, block: nn.Module) -> Cost:
    total = Cost()
    for site in adapter.sites(block):
        for path in site.linears:
            total = total + module_cost(block.get_submodule(path))
    return total


def blocks_cost(adapter: Adapter) -> Cost:
    total = Cost()
    for block in adapter.blocks():
        total = total + block_cost(adapter, block)
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
    """Per-block, per-site kept fraction of cost, resolved before compression starts."""

    budget: float
    unit: BudgetUnit
    targets: dict[int, dict[str, float]] = field(default_factory=dict)

    def for_block(self, index: int) -> dict[str, float]:
        return self.targets[index]

    def rows(self) -> list[dict]:
        return [
            {"block": b, "site": s, "target": f}
            for b, sites in self.targets.items()
            for s, f in sites.items()
        ]


def uniform(adapter: Adapter, budget: float, unit: BudgetUnit) -> Plan:
    plan = Plan(budget, unit)
    for i, block in enumerate(adapter.blocks()):
        plan.targets[i] = {site.name: budget for site in adapter.sites(block)}
    return plan


SCHEDULES: dict[str, Callable[[Adapter, float, BudgetUnit], Plan]] = {"uniform": uniform}


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise ShrinkError(f"unknown schedule {name!r}; valid: {', '.join(sorted(SCHEDULES))}")


def make_plan(name: str, adapter: Adapter, budget: float, unit: BudgetUnit) -> Plan:
    check_schedule(name)
    return SCHEDULES[name](adapter, budget, BudgetUnit(unit))
