"""Candidate edits of one block's units, prepared once for a search over plans.

For every unit (a profile curve: `id`'s heads, its FFN) and every option a search may give it,
a copy of the block is compressed by the method itself with that option for the unit and every
other unit of the block kept whole; the unit's edited linears are kept. A plan is then assembled
block by block from those linears without running the method again: a unit's edit reads only
its own sites' statistics, so the units of a block combine freely.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from torch import nn

from ..models import Adapter
from ..planning.budget import Curve
from .context import BlockContext

# block-relative path -> the edited linear; empty when the option keeps the unit whole
UnitEdit = dict[str, nn.Module]


def whole_option(curve: Curve) -> int:
    """The option of `curve` that keeps the unit as it is (its dense cost)."""
    dense = [
        j for j, o in enumerate(curve.options) if abs(o.cost - curve.dense_cost) <= 1e-9 * curve.dense_cost
    ]
    if not dense:
        raise ValueError(f"unit {curve.name!r} of block {curve.block} offers no option that keeps it whole")
    return min(dense, key=lambda j: curve.options[j].error)


def unit_paths(ctx: BlockContext, curve: Curve) -> list[str]:
    """The linears a unit's edit may change: the one it is named after (a low-rank method's
    unit is one matrix of a site that others share), else every linear of its sites."""
    paths = [path for name in curve.sites for path in ctx.site(name).linears]
    return [curve.name] if curve.name in paths else paths


def prepare(
    ctx: BlockContext, adapter: Adapter, method, units: list[tuple[Curve, list[int]]]
) -> list[dict[int, UnitEdit]]:
    """Per unit of this block (its curve and the options to prepare), option -> its edit."""
    keeps = {curve.name: whole_option(curve) for curve, _ in units}
    whole = {curve.name: curve.options[keeps[curve.name]] for curve, _ in units}
    edits = []
    for curve, options in units:
        prepared: dict[int, UnitEdit] = {}
        for j in options:
            option = curve.options[j]
            if j == keeps[curve.name]:
                prepared[j] = {}
                continue
            block = copy.deepcopy(ctx.block)
            chosen = {**whole, curve.name: option}
            choices = {c.name: {**chosen[c.name].choice, "sites": c.sites} for c, _ in units}
            targets = {s.name: 1.0 for s in ctx.sites}
            for c, _ in units:
                for site in c.sites:
                    targets[site] = chosen[c.name].cost / c.dense_cost
            method.compress_block(
                replace(
                    ctx, block=block, choices=choices, targets=targets, attention=adapter.attention(block)
                )
            )
            prepared[j] = {path: block.get_submodule(path).to("cpu") for path in unit_paths(ctx, curve)}
        edits.append(prepared)
    return edits


def assemble(dense: nn.Module, adapter: Adapter, edits: list[UnitEdit]) -> nn.Module:
    """A copy of the dense block with the units' edited linears put in, its attention told the
    head counts they hold (and computing at their widths where the family can)."""
    block = copy.deepcopy(dense)
    device = next(dense.parameters()).device
    for edit in edits:
        for path, module in edit.items():
            block.set_submodule(path, copy.deepcopy(module).to(device) if device.type != "cpu" else module)
    attention = adapter.attention(block)
    attention.set_counts(*attention.counts())
    return block
