"""The types schedules plan with: a method's error profiles (Curves of Options) and the Plan.

`budget` is the fraction of the block linears' cost that is kept (priced by `cost.CostModel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import BudgetUnit, ErrorCurrency
from .cost import CostTable


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
    # a last resort: profile-driven schedules use it only when the budget cannot be met without
    # reserves (id's whole-head drops under `attention=auto`, whose ID error understates the harm)
    reserve: bool = False
    # for methods that rank units by a score (FLAP, Wanda-sp): the highest score among the units this
    # option removes (None: it removes none), which `schedule=threshold` compares across blocks
    score: float | None = None


@dataclass
class Curve:
    """The error-vs-cost options of one independently compressible unit of one block (a
    method's profile: the FFN neurons, the heads, one matrix's rank)."""

    block: int
    name: str
    sites: tuple[str, ...]
    dense_cost: float
    options: list[Option]
    # for units whose output is added to the residual stream (None otherwise, as low-rank q, k):
    # their dense output energy per token, e²·energy being the error they add, and the typical
    # token's ‖h‖² entering and leaving the block (Runner: BlockContext.residual_energy)
    energy: float | None = None
    residual: tuple[float, float] | None = None


@dataclass(frozen=True)
class Sizes:
    """What one unit of a block can be cut to, priced from its shapes alone: the costs of the
    options its profile will offer (or the sizes it may take under a fixed schedule). Enough to
    tell, before anything loads, that a budget is out of reach."""

    block: int
    name: str
    sites: tuple[str, ...]
    dense_cost: float
    costs: tuple[float, ...]


@dataclass
class PlanInputs:
    """What schedules may use besides the budget."""

    costs: CostTable  # dense costs in the budget unit
    budget: float
    prunes_heads: bool = False  # the method removes heads, so attention-score MACs can shrink
    curves: list[Curve] | None = None  # error profiles, for schedules that need them
    min_keep: float = 0.0  # greedy: the least share of its dense cost any unit keeps
    k: int = 0  # last_k / first_k: how many blocks are compressed
    dense_ends: tuple[int, int] = (0, 0)  # span: blocks left dense at the bottom and at the top
    error: ErrorCurrency = ErrorCurrency.unit  # greedy: what errors are compared in
    schedule: str = ""  # the schedule's name, as the user chose it (for messages)

    @property
    def unit(self) -> BudgetUnit:
        return self.costs.unit
