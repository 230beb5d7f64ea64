"""Schedules: turn the global budget into per-block, per-site targets (a Plan) before compression.

Schedules read dense costs from a `CostTable` (plain numbers, in the budget unit); the fixed ones
(`uniform`, `last_k`, `first_k`, `span`, in `fixed.py`) need nothing else; `energy`, `greedy` and
`threshold` also need the method's error profiles (Curves) from a planning pass. Every schedule
registers here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from ..config import ErrorCurrency, ScheduleConf
from ..errors import ShrinkError
from ..registry import Registry
from .budget import Curve, Option, Plan, PlanInputs, Sizes
from .fixed import SLACK, dense_costs, first_k, last_k, span, uniform
from .schedule_config import (
    EnergyConf,
    FirstKConf,
    GreedyConf,
    LastKConf,
    SearchConf,
    SpanConf,
    ThresholdConf,
    UniformConf,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class Unreachable(ShrinkError):
    """The budget is below what the units' smallest options keep."""


@dataclass
class _Profiles:
    """The curves as arrays, with the cost allowance they share."""

    curves: list[Curve]
    site_costs: list[dict[str, float]]
    budget: float
    total: float  # dense cost of all blocks
    fixed: float  # what no unit can shrink
    costs: list[np.ndarray]
    errors: list[np.ndarray]  # squared relative errors: energy fractions, additive across units

    @property
    def allowance(self) -> float:
        return self.budget * self.total - self.fixed

    def spent(self, choice: list[int]) -> float:
        return float(sum(c[j] for c, j in zip(self.costs, choice, strict=True)))


def _error_weights(curves: list[Curve], currency: ErrorCurrency) -> list[float]:
    """What one unit of each curve's squared relative error is worth in the common currency."""
    if currency == ErrorCurrency.unit:
        return [1.0] * len(curves)
    missing = next((c.name for c in curves if c.energy is None or c.residual is None), None)
    if missing is not None:
        raise ShrinkError(
            f"schedule.error={currency.value} needs units whose outputs add to the residual stream; unit "
            f"{missing!r} is not one (use schedule.error=unit)"
        )
    if currency == ErrorCurrency.residual:  # the error as a share of the stream it is added to
        return [c.energy / c.residual[0] if c.residual[0] > 0 else 0.0 for c in curves]
    # downstream: an error added by block b reaches, through the skip connections, the input of
    # every later block and the final norm; it counts once relative to each of them
    leaving = {c.block: c.residual[1] for c in curves}
    after, total = {}, 0.0
    for b in sorted(leaving, reverse=True):  # Σ over blocks c ≥ b of 1/‖h_out,c‖²
        total += 1.0 / leaving[b] if leaving[b] > 0 else 0.0
        after[b] = total
    return [c.energy * after[c.block] for c in curves]


def _profiles(inputs: PlanInputs, name: str, min_keep: float = 0.0) -> _Profiles:
    if not inputs.curves:
        raise ShrinkError(f"schedule {name!r} needs the method's error profiles, and it gave none")
    weights = _error_weights(inputs.curves, inputs.error)
    site_costs, _ = dense_costs(inputs)
    total = sum(sum(c.values()) for c in site_costs)
    curves = [
        Curve(c.block, c.name, c.sites, c.dense_cost, _at_least(c.options, min_keep * c.dense_cost))
        for c in inputs.curves
    ]
    return _Profiles(
        curves,
        site_costs,
        inputs.budget,
        total,
        total - sum(c.dense_cost for c in curves),
        [np.array([o.cost for o in c.options], dtype=np.float64) for c in curves],
        [
            np.array([o.error for o in c.options], dtype=np.float64) ** 2 * w
            for c, w in zip(curves, weights, strict=True)
        ],
    )


def _whole(inputs: PlanInputs, p: _Profiles) -> Plan | None:
    """Every unit kept whole, when that fits the budget: at budget 1 (or any budget the dense
    blocks meet) nothing is cut, whatever options of zero calibration error a rank-deficient
    profile offers and however the sums of prices round. None when it does not fit."""
    whole = _whole_choice(p)
    return None if whole is None else _plan_from(inputs, p.site_costs, p.curves, whole)


def _whole_choice(p: _Profiles) -> list[int] | None:
    whole = []
    for curve in p.curves:
        dense = [
            j
            for j, o in enumerate(curve.options)
            if abs(o.cost - curve.dense_cost) <= SLACK * curve.dense_cost
        ]
        if not dense:
            return None
        whole.append(min(dense, key=lambda j: curve.options[j].error))
    if p.spent(whole) > p.allowance + SLACK * p.total:
        return None
    return whole


def _smallest_fitting(fits: Callable[[float], bool], lo: float, hi: float, steps: int = 100) -> float:
    """Bisection for the smallest x in [lo, hi] with fits(x), given fits(hi) and monotonicity."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def energy(inputs: PlanInputs) -> Plan:
    """A global threshold on retained energy: every unit keeps its cheapest option whose squared
    relative error (discarded energy) is at most t, with t bisected to the smallest value whose
    allocation fits the budget. For low-rank methods this is the rank at which each matrix keeps a
    fraction 1 − t of its spectrum's energy (of W·S for svdllm, of WCWᵀ for rom)."""
    p = _profiles(inputs, "energy")
    whole = _whole(inputs, p)
    if whole is not None:
        return whole

    def pick(t: float) -> list[int]:
        return [
            int(np.where(e <= t + 1e-15, c, np.inf).argmin()) for c, e in zip(p.costs, p.errors, strict=True)
        ]

    if p.spent(pick(1.0)) > p.allowance + 1e-9:
        raise Unreachable(
            f"budget {inputs.budget} cannot be met by schedule {inputs.schedule or 'energy'!r}: the smallest "
            "option of every unit already exceeds it"
        )
    t = _smallest_fitting(lambda t: p.spent(pick(t)) <= p.allowance + 1e-9, 0.0, 1.0)
    return _plan_from(inputs, p.site_costs, p.curves, pick(t))


def threshold(inputs: PlanInputs) -> Plan:
    """FLAP's adaptive allocation across layers and modules (AL-AM): one threshold t on the units'
    scores, shared by every block and module; each unit removes exactly its parts scoring at most t
    (its cheapest option whose `score` is ≤ t), and t is the lowest value whose allocation fits the
    budget. Costs enter only through the budget, as in FLAP: a head and a neuron of equal score go
    together, however different their prices. The scores must be comparable across blocks (FLAP
    standardises them per layer and module)."""
    p = _profiles(inputs, "threshold")
    unscored = [c.name for c in p.curves if any(o.score is None and o.cost < c.dense_cost for o in c.options)]
    if unscored:
        raise ShrinkError(
            f"schedule 'threshold' ranks units by their scores, and unit {unscored[0]!r} has none; "
            "use a method that scores units (flap, wanda-sp)"
        )
    whole = _whole(inputs, p)
    if whole is not None:
        return whole
    scores = [np.array([-np.inf if o.score is None else o.score for o in c.options]) for c in p.curves]

    def pick(t: float) -> list[int]:
        return [int(np.where(s <= t, c, np.inf).argmin()) for c, s in zip(p.costs, scores, strict=True)]

    candidates = np.unique(np.concatenate(scores))
    candidates = candidates[np.isfinite(candidates)]
    fits = [t for t in candidates if p.spent(pick(t)) <= p.allowance + SLACK * p.total]
    if not fits:
        raise Unreachable(
            f"budget {inputs.budget} cannot be met by schedule 'threshold': removing every unit the "
            "method may remove still keeps more"
        )
    return _plan_from(inputs, p.site_costs, p.curves, pick(min(fits)))


def _at_least(options: list[Option], floor: float) -> list[Option]:
    """The options costing at least `floor` (the most expensive one always stays)."""
    kept = [o for o in options if o.cost >= floor - 1e-9]
    return kept or [max(options, key=lambda o: o.cost)]


def greedy(inputs: PlanInputs) -> Plan:
    """Global allocation by calibration error per unit cost (STAT's schedule).

    Every unit (curve) offers options of (cost, normalised error e). Minimising the summed e²
    under the cost budget is relaxed with a Lagrange multiplier μ, the price of one unit of cost:
    each curve takes the option minimising e² + μ·cost, and μ is bisected to the cheapest
    price whose allocation fits. What is left of the budget is then spent greedily on the upgrade
    with the largest error drop per unit cost that still fits. Squared relative errors are used
    because they add up across units; the plain relative error is a square root, steep near 0,
    which would make finishing any unit look worth its cost.
    """
    p, choice = greedy_choice(inputs)
    return _plan_from(inputs, p.site_costs, p.curves, choice)


def greedy_choice(inputs: PlanInputs) -> tuple[_Profiles, list[int]]:
    """`greedy`'s allocation as an option index per curve of the profiles it planned on."""
    p = _profiles(inputs, "greedy", inputs.min_keep)
    whole = _whole_choice(p)
    if whole is not None:
        return p, whole
    costs, errors, allowance = p.costs, p.errors, p.allowance

    def pick(mu: float) -> list[int]:
        return [int(np.lexsort((c, e + mu * c))[0]) for c, e in zip(costs, errors, strict=True)]

    cheapest = float(sum(c.min() for c in costs))
    if cheapest > allowance + 1e-9:
        raise Unreachable(
            f"budget {inputs.budget} cannot be met by schedule {inputs.schedule or 'greedy'!r}: the smallest "
            f"option of every unit keeps {(cheapest + p.fixed) / p.total:.4f} of the block cost "
            f"(min_keep={inputs.min_keep})"
        )
    hi = 1.0 / max(p.total, 1.0)
    while p.spent(pick(hi)) > allowance + 1e-9:
        hi *= 2
    mu = _smallest_fitting(lambda mu: p.spent(pick(mu)) <= allowance + 1e-9, 0.0, hi)
    spent = p.spent
    choice = pick(mu)
    slack = allowance - spent(choice)
    while True:  # spend the slack on the best-value upgrade that fits
        best = None
        for u, (c, e) in enumerate(zip(costs, errors, strict=True)):
            extra, gain = c - c[choice[u]], e[choice[u]] - e
            ok = (extra > 0) & (extra <= slack + 1e-9) & (gain > 0)
            if ok.any():
                rate = np.where(ok, gain / np.where(ok, extra, 1.0), -np.inf)
                j = int(rate.argmax())
                if best is None or rate[j] > best[0]:
                    best = (rate[j], u, j)
        if best is None:
            break
        _, u, j = best
        slack -= costs[u][j] - costs[u][choice[u]]
        choice[u] = j
    return p, choice


def _plan_from(inputs: PlanInputs, site_costs, curves: list[Curve], choice: list[int]) -> Plan:
    """Targets: per site, the kept share of the dense cost of the units covering it."""
    plan = Plan(inputs.budget, inputs.unit)
    for b, costs_b in enumerate(site_costs):
        plan.targets[b] = dict.fromkeys(costs_b, 1.0)
    kept: dict[tuple[int, str], list[float]] = {}
    for curve, j in zip(curves, choice, strict=True):
        option = curve.options[j]
        for s in curve.sites:
            cell = kept.setdefault((curve.block, s), [0.0, 0.0])
            cell[0] += option.cost
            cell[1] += curve.dense_cost
        plan.choices.setdefault(curve.block, {})[curve.name] = {**option.choice, "sites": curve.sites}
    for (b, s), (cost, dense) in kept.items():
        plan.targets[b][s] = cost / dense
    return plan


def _reserves_last(schedule: Callable[[PlanInputs], T]) -> Callable[[PlanInputs], T]:
    """Plan on the options that are not reserves; only when those cannot meet the budget, on all."""

    def plan(inputs: PlanInputs) -> T:
        curves = inputs.curves or []
        if not any(o.reserve for c in curves for o in c.options):
            return schedule(inputs)
        preferred = [replace(c, options=[o for o in c.options if not o.reserve] or c.options) for c in curves]
        try:
            return schedule(replace(inputs, curves=preferred))
        except Unreachable:
            log.info("budget %s is out of reach without the reserve options; using them", inputs.budget)
            return schedule(inputs)

    plan.__doc__ = schedule.__doc__
    return plan


# What `schedule=search` starts from and moves within: `greedy`'s profiles and choice, on the
# options that are not reserves unless the budget needs them
search_seed = _reserves_last(greedy_choice)


def plan_from_choice(inputs: PlanInputs, profiles: _Profiles, choice: list[int]) -> Plan:
    """The plan of one option index per curve of `profiles`."""
    return _plan_from(inputs, profiles.site_costs, profiles.curves, choice)


@dataclass(frozen=True)
class Schedule:
    plan: Callable[[PlanInputs], Plan]
    needs_profiles: bool  # plans on the method's error profiles (a planning pass before compression)
    needs_scores: bool = False  # compares the units' scores (Option.score), which few methods give
    # the plan is the seed of a search that scores plans on the model itself (`run/search.py`)
    searches: bool = False


SCHEDULES: Registry[Schedule] = Registry("schedule", __name__)


def register(
    name: str,
    schema: type[ScheduleConf] | None,
    plan: Callable[[PlanInputs], Plan],
    needs_profiles: bool = False,
    needs_scores: bool = False,
    searches: bool = False,
) -> None:
    """A schedule registers once: its config name, its keys (`schema`, stored as
    `schema/schedule/<name>`; None: it shares another's) and its planning function."""
    SCHEDULES.register(name, schema)(Schedule(plan, needs_profiles, needs_scores, searches))


register("uniform", UniformConf, uniform)
register("last_k", LastKConf, last_k)
register("first_k", FirstKConf, first_k)
register("span", SpanConf, span)
register("energy", EnergyConf, _reserves_last(energy), needs_profiles=True)
register("greedy", GreedyConf, _reserves_last(greedy), needs_profiles=True)
# greedy with schedule.error=residual (conf/schedule/greedy-residual.yaml)
register("greedy-residual", None, _reserves_last(greedy), needs_profiles=True)
register("threshold", ThresholdConf, threshold, needs_profiles=True, needs_scores=True)
# greedy's plan (schedule.error=residual by default), then an evolutionary search on the model
register(
    "search", SearchConf, lambda inputs: plan_from_choice(inputs, *search_seed(inputs)), True, searches=True
)


def needs_profiles(name: str) -> bool:
    return SCHEDULES.get(name).needs_profiles


def needs_scores(name: str) -> bool:
    return SCHEDULES.get(name).needs_scores


def searches(name: str) -> bool:
    return SCHEDULES.get(name).searches


def check_schedule(name: str) -> None:
    SCHEDULES.check(name)


def make_plan(name: str, inputs: PlanInputs) -> Plan:
    return SCHEDULES.get(name).plan(inputs)


def least_kept(
    inputs: PlanInputs, sizes: list[Sizes], plan: Plan | None
) -> tuple[float, float, int | None] | None:
    """Where the sizes the method may keep (priced from shapes alone) cannot meet the budget: the
    least share of the cost they keep, the share asked for, and the block (None: all blocks, for
    a schedule that allocates globally: `plan` is None). None where the budget is in reach."""
    site_costs, _ = dense_costs(inputs)
    if plan is None:  # greedy / energy: every unit at its smallest size above min_keep
        total = sum(sum(c.values()) for c in site_costs)
        fixed = total - sum(z.dense_cost for z in sizes)
        floor = inputs.min_keep
        cheapest = sum(
            min((c for c in z.costs if c >= floor * z.dense_cost - 1e-9), default=max(z.costs)) for z in sizes
        )
        least = (cheapest + fixed) / total
        return (least, inputs.budget, None) if least > inputs.budget + SLACK else None
    for b, costs in enumerate(site_costs):
        units = [z for z in sizes if z.block == b]
        covered = {site for z in units for site in z.sites}
        cheapest = sum(min(z.costs) for z in units) + sum(c for s, c in costs.items() if s not in covered)
        allowance = sum(plan.targets[b][s] * c for s, c in costs.items())
        dense = sum(costs.values())
        if cheapest > allowance + SLACK * dense:
            return cheapest / dense, allowance / dense, b
    return None
