"""The fixed schedules: plans from the dense cost table alone, no planning pass (`uniform`,
`last_k`, `first_k`, `span`), and the rounding rules every schedule shares."""

from __future__ import annotations

from ..errors import ShrinkError
from .budget import Plan, PlanInputs

# relative slack on sums of prices: float sums of the same costs in another order differ by ~1e-16
# relative, far below one weight, and must not turn "everything fits" into a cut
SLACK = 1e-9


def dense_costs(inputs: PlanInputs) -> tuple[list[dict[str, float]], list[float]]:
    """Per block: each site's dense cost, and the attention-score MACs inside `attn_out`."""
    return inputs.costs.sites, inputs.costs.scores


def _snapped(fraction: float) -> float:
    """A kept fraction within rounding of 1 is 1: a sum of prices that rounds a hair below the
    dense cost must not cost a neuron."""
    return 1.0 if fraction > 1.0 - SLACK else fraction


def _block_fraction(
    inputs: PlanInputs, index: int, costs: dict[str, float], score: float, fraction: float
) -> float:
    """The per-site fraction that keeps `fraction` of block `index`. Where the method cannot shrink
    the attention-score MACs (it keeps every head), the linears keep a little less."""
    if not score or inputs.prunes_heads:
        return fraction
    linears = sum(costs.values()) - score
    adjusted = _snapped((fraction * sum(costs.values()) - score) / linears)
    if adjusted <= 0:
        raise ShrinkError(
            f"budget {inputs.budget} in macs cannot be met: block {index}'s attention-score MACs "
            f"alone are {score / sum(costs.values()):.3f} of the block and this method keeps "
            "every head; raise the budget or lower budget_seq_len"
        )
    return adjusted


def uniform(inputs: PlanInputs) -> Plan:
    """The same kept fraction everywhere."""
    plan = Plan(inputs.budget, inputs.unit)
    for i, (costs, score) in enumerate(zip(*dense_costs(inputs), strict=True)):
        plan.targets[i] = dict.fromkeys(costs, _block_fraction(inputs, i, costs, score, inputs.budget))
    return plan


def _only(inputs: PlanInputs, chosen: set[int], which: str, fix: str) -> Plan:
    """The blocks in `chosen` at the one fraction that meets the budget; the others dense."""
    site_costs, scores = dense_costs(inputs)
    totals = [sum(c.values()) for c in site_costs]
    rest = sum(t for i, t in enumerate(totals) if i not in chosen)
    fraction = (inputs.budget * sum(totals) - rest) / sum(totals[i] for i in chosen)
    if fraction <= 0:
        raise ShrinkError(
            f"budget {inputs.budget} cannot be met by compressing only {which}: the other blocks alone "
            f"keep {rest / sum(totals):.3f}; {fix}"
        )
    plan = Plan(inputs.budget, inputs.unit)
    for i, (costs, score) in enumerate(zip(site_costs, scores, strict=True)):
        f = _block_fraction(inputs, i, costs, score, _snapped(fraction)) if i in chosen else 1.0
        plan.targets[i] = dict.fromkeys(costs, f)
    return plan


def _only_k(inputs: PlanInputs, last: bool) -> Plan:
    n, k = len(inputs.costs.sites), inputs.k
    which = "last_k" if last else "first_k"
    if not 1 <= k <= n:
        raise ShrinkError(f"schedule {which}: k={k} must be between 1 and the model's {n} blocks")
    chosen = set(range(n - k, n)) if last else set(range(k))
    return _only(inputs, chosen, f"the {which.split('_')[0]} {k} of {n} blocks", "raise k or the budget")


def last_k(inputs: PlanInputs) -> Plan:
    """LLM-ROM's heuristic: only the last k blocks are compressed, at the block budget that meets
    the global one (the early blocks, which every later one builds on, stay dense)."""
    return _only_k(inputs, last=True)


def first_k(inputs: PlanInputs) -> Plan:
    """Lillama's bottom-first counterpart: only the first k blocks are compressed."""
    return _only_k(inputs, last=False)


def span(inputs: PlanInputs) -> Plan:
    """LLM-Pruner's block-wise allocation: the first `dense_first` and the last `dense_last` blocks
    stay dense (the ones it found most sensitive), every block between them keeps one fraction."""
    n = len(inputs.costs.sites)
    first, last = inputs.dense_ends
    if first < 0 or last < 0 or first + last >= n:
        raise ShrinkError(
            f"schedule span: dense_first={first} and dense_last={last} must be ≥ 0 and leave at least one "
            f"of the model's {n} blocks to compress"
        )
    chosen = set(range(first, n - last))
    return _only(
        inputs,
        chosen,
        f"blocks {first}–{n - last - 1} of {n}",
        "lower dense_first or dense_last, or raise the budget",
    )
