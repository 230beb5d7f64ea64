"""Which attention columns `id` keeps: whole heads (KV-group constraints), value dims per KV head,
the options a plan chooses among and their ID errors.

Z is the attention output (o_proj's input), one block of head_dim columns per query head. Heads
are picked by the block greedy ID; value dims by the greedy over units of columns, one unit being
one value dim in each kept query head of a KV group (they all read the same value head), in
balanced rounds so that every kept KV head keeps the same width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...linalg.decompositions import Pivots, balanced, block_pivoted_cholesky, unit_pivoted_cholesky
from ...planning.budget import Option
from ...planning.cost import HeadCosts
from .config import AttentionUnits


def group_constraint(n_heads: int, n_kv: int, m: int, q: int):
    """Mask of heads that may still be picked so that at most m KV groups open and each holds at
    most q query heads: the selection ends with exactly q heads in each of m groups."""
    group = n_heads // n_kv
    groups = torch.arange(n_heads) // group

    def eligible(chosen: list[int]) -> torch.Tensor:
        counts = torch.zeros(n_kv, dtype=torch.long)
        for h in chosen:
            counts[h // group] += 1
        opened = int((counts > 0).sum())
        return (counts[groups] < q) & ((counts[groups] > 0) | (opened < m))

    return eligible


def _value_units(heads: list[int], group: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One unit per (kept KV group, value dim), holding that dim's column in each of the group's
    kept query heads; and the index of each unit's group among the kept ones."""
    by_group: dict[int, list[int]] = {}
    for h in sorted(heads):
        by_group.setdefault(h // group, []).append(h)
    units, groups = [], []
    for i, members in enumerate(by_group.values()):
        for j in range(head_dim):
            units.append([h * head_dim + j for h in members])
            groups.append(i)
    return torch.tensor(units, dtype=torch.long), torch.tensor(groups, dtype=torch.long)


def value_selection(
    gram: torch.Tensor, heads: list[int], group: int, head_dim: int, width: int
) -> tuple[Pivots, torch.Tensor]:
    """The balanced greedy over the kept heads' value dims, `width` rounds (one pick per kept KV
    group each): the picks (unit order, and the residual energy after each) and each unit's group."""
    units, groups = _value_units(heads, group, head_dim)
    n_groups = int(groups.max()) + 1
    return unit_pivoted_cholesky(gram, units, n_groups * width, balanced(groups)), groups


def value_dims(
    gram: torch.Tensor | None, heads: list[int], group: int, head_dim: int, width: int
) -> dict[int, torch.Tensor]:
    """KV head -> the `width` value dims it keeps (sorted); all of them at full width, where no
    Gram matrix is needed."""
    kv_kept = sorted({h // group for h in heads})
    if width >= head_dim:
        return {g: torch.arange(head_dim) for g in kv_kept}
    assert gram is not None, "value thinning selects from the Gram matrix (checked up front)"
    picked, groups = value_selection(gram, heads, group, head_dim, width)
    chosen = torch.tensor(picked.order, dtype=torch.long)
    return {g: (chosen[groups[chosen] == i] % head_dim).sort().values for i, g in enumerate(kv_kept)}


class Shape(NamedTuple):
    """What one attention option keeps: m KV groups of q query heads, `v` value dims and `qk`
    query/key dims per head; `reserve`: a last resort of the plan (`auto`'s whole-head drops)."""

    m: int
    q: int
    v: int
    qk: int
    reserve: bool = False


def candidates(
    mode: AttentionUnits, costs: HeadCosts, step: int, qk_widths: list[int] | None = None
) -> list[Shape]:
    """The shapes the attention may keep. `auto` offers the `dims` options, and whole-head drops as
    reserves (used only when the budget is out of reach without them). Query/key widths
    (`qk_widths`, thinning on) combine with every value width of the full set of heads."""
    full, dh = (costs.n_kv, costs.group), costs.head_dim
    widths = costs.widths(step)
    if mode == AttentionUnits.heads:
        return [Shape(m, q, dh, dh) for m, q in costs.options()]
    thin = [Shape(*full, w, d) for w in widths for d in (qk_widths or [dh])]
    if mode == AttentionUnits.dims:
        return thin
    if mode == AttentionUnits.both:
        return [Shape(m, q, w, dh) for m, q in costs.options() for w in widths] + [
            s for s in thin if s.qk < dh
        ]
    return thin + [Shape(m, q, dh, dh, True) for m, q in costs.options() if (m, q) != full]


def attention_options(
    costs: HeadCosts,
    gram: torch.Tensor,
    total: float | None,
    offered: list[Shape],
    qk_errors: dict[int, float] | None = None,
) -> list[Option]:
    """Each offered shape with its cost and relative error: the ID that keeps those columns
    (against `total`, by default the Gram's trace; heads by the block greedy, then value dims in
    balanced rounds over the kept KV groups, one run giving every width), and for thinner queries
    and keys their measured squared error (`qk_errors`), added in squares."""
    dh = costs.head_dim
    total = total if total is not None else float(torch.diagonal(gram).clamp_min(0).sum())
    by_heads: dict[tuple[int, int], list[Shape]] = {}
    for shape in offered:
        by_heads.setdefault((shape.m, shape.q), []).append(shape)
    options = []
    for (m, q), shapes in by_heads.items():
        eligible = group_constraint(costs.n_heads, costs.n_kv, m, q)
        picked = block_pivoted_cholesky(gram, dh, m * q, eligible)
        lefts = {dh: float(picked.remaining[-1])}
        thinner = [s.v for s in shapes if s.v < dh]
        if thinner:
            dims, _ = value_selection(gram, list(picked.order), costs.group, dh, max(thinner))
            lefts |= {w: float(dims.remaining[m * w]) for w in thinner}
        for s in shapes:
            squared = max(lefts[s.v], 0.0) / total if total > 0 else 0.0
            if s.qk < dh:  # measured for every offered query/key width
                assert qk_errors is not None, "thinner queries and keys come with their errors"
                squared += qk_errors[s.qk]
            error = squared**0.5
            choice = {"heads": m * q, "kv_groups": m, "heads_per_group": q, "v_width": s.v, "qk_width": s.qk}
            options.append(Option(costs.of(m, q, s.v, s.qk), error, choice, s.reserve))
    return options


def sketch_heads(sketch: torch.Tensor, dh: int, count: int, eligible) -> list[int]:
    """Block pivoted QR on an explicit row sketch ΩZ: the check path for head selection."""
    a = sketch.to(torch.float64).clone()
    n_heads = a.shape[1] // dh
    chosen: list[int] = []
    for _ in range(count):
        energy = (a * a).sum(0).view(n_heads, dh).sum(1)
        mask = eligible(chosen)
        mask[chosen] = False
        energy[~mask] = -1.0
        h = int(energy.argmax())
        chosen.append(h)
        basis, _ = torch.linalg.qr(a[:, h * dh : (h + 1) * dh])
        a -= basis @ (basis.T @ a)
    return chosen
