"""Allocation by search: an evolutionary search over the per-unit options of a plan.

A rule such as `greedy-residual` prices each unit by its own calibration error and adds those up;
what the model then does with the errors of all units together (they pass through the blocks
above, the softmax, the final norm) is not in the sum. The search instead scores whole plans by a
fitness the caller measures on the model (shrink: the KL divergence of the final logits to the
dense model's on held-aside calibration windows), starting from the rule's plan.

The space is local: each unit may move a few steps of cost up or down from its seed option
(`local_options`). A child moves cost from some units to others in pairs, so it stays on budget;
a (1 + λ) strategy keeps the best plan seen, so the result is never worse than the seed on the
fitness, and everything is drawn from one seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class SearchResult:
    choice: list[int]  # option index per unit (into each unit's options)
    fitness: float  # of `choice` (lower is better)
    seed_fitness: float  # of the seed plan
    evaluations: int  # fitness calls made (distinct plans)
    history: list[float]  # best fitness after each generation


def local_options(
    costs: list[np.ndarray], seed: list[int], dense: list[float], step: float, reach: int
) -> list[list[int]]:
    """Per unit, its options nearest to the seed's cost ± 1 … `reach` steps of `step`·dense cost,
    the seed's own option included, sorted by cost (distinct options only)."""
    ladders = []
    for c, j0, full in zip(costs, seed, dense, strict=True):
        picked = {j0}
        for s in range(-reach, reach + 1):
            if s == 0:
                continue
            target = c[j0] + s * step * full
            if (s < 0 and target < c.min() - 0.5 * step * full) or (
                s > 0 and target > c.max() + 0.5 * step * full
            ):
                continue  # beyond the unit's cheapest or dearest option
            picked.add(int(np.abs(c - target).argmin()))
        ladders.append(sorted(picked, key=lambda j: (c[j], j)))
    return ladders


def evolve(
    costs: list[np.ndarray],
    allowance: float,
    ladders: list[list[int]],
    seed: list[int],
    fitness: Callable[[list[int]], float],
    evaluations: int,
    offspring: int = 4,
    moves: int = 2,
    rng_seed: int = 0,
) -> SearchResult:
    """The best plan found within `evaluations` fitness calls (the seed's included). Each of a
    generation's `offspring` children makes 1 … `moves` pair moves on the best plan so far: one
    unit one rung up its ladder, another one rung down; a child over `allowance` is repaired by
    further rungs down on random units, and dropped if that cannot fit it."""
    rng = np.random.default_rng(rng_seed)
    where = [ladder.index(j) for ladder, j in zip(ladders, seed, strict=True)]  # rung of each unit

    def spent(rungs: list[int]) -> float:
        return float(sum(c[ladder[r]] for c, ladder, r in zip(costs, ladders, rungs, strict=True)))

    def choice(rungs: list[int]) -> list[int]:
        return [ladder[r] for ladder, r in zip(ladders, rungs, strict=True)]

    seen: dict[tuple[int, ...], float] = {}

    def score(rungs: list[int]) -> float:
        key = tuple(rungs)
        if key not in seen:
            seen[key] = float(fitness(choice(rungs)))
        return seen[key]

    best, best_fit = list(where), score(where)
    seed_fit, history = best_fit, [best_fit]
    units = len(ladders)
    attempts = 0
    while len(seen) < evaluations and attempts < 50 * evaluations:
        children = []
        while len(children) < offspring and attempts < 50 * evaluations:
            attempts += 1
            child = list(best)
            for _ in range(int(rng.integers(1, moves + 1))):
                up = [u for u in range(units) if child[u] < len(ladders[u]) - 1]
                down = [u for u in range(units) if child[u] > 0]
                if not up or not down:
                    break
                a = int(rng.choice(up))
                down = [u for u in down if u != a]
                if not down:
                    break
                b = int(rng.choice(down))
                child[a] += 1
                child[b] -= 1
            while spent(child) > allowance + 1e-9:  # repair: one more rung down somewhere
                lower = [u for u in range(units) if child[u] > 0]
                if not lower:
                    break
                child[int(rng.choice(lower))] -= 1
            if spent(child) <= allowance + 1e-9 and tuple(child) not in seen:
                children.append(child)
        if not children:
            break
        for child in children[: max(evaluations - len(seen), 0)]:
            f = score(child)
            if f < best_fit:
                best, best_fit = child, f
        history.append(best_fit)
    return SearchResult(choice(best), best_fit, seed_fit, len(seen), history)
