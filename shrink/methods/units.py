"""What pruning methods share about structured units (FFN neurons, heads): their prices within
a block's target and the per-unit row a method records."""

from __future__ import annotations

import time

from ..blocks.context import BlockContext
from ..planning.cost import NeuronCosts, module_cost


def site_fraction(ctx: BlockContext, names: tuple[str, str]) -> float:
    """The target of a unit spanning two sites, weighted by their dense costs."""
    costs = {n: ctx.price(n) for n in names}
    return sum(ctx.targets[n] * costs[n] for n in names) / sum(costs.values())


def ffn_costs(ctx: BlockContext, adds_bias: bool) -> NeuronCosts:
    """The price of keeping k of the block's FFN neurons (`adds_bias`: the output projection gains
    a bias once any is dropped)."""
    ins = [ctx.block.get_submodule(p) for p in ctx.site("mlp_in").linears]
    return ctx.costs.neurons(ins, ctx.block.get_submodule(ctx.site("mlp_out").linears[0]), adds_bias)


def neuron_sizes(neurons: int, multiple: int) -> list[int]:
    """The neuron counts an FFN may keep: multiples of the width multiple, and all of them."""
    return [k for k in range(1, neurons + 1) if k % multiple == 0 or k == neurons]


def unit_record(ctx, unit_name, kept, total, before, paths, fraction, error, start, **extra) -> dict:
    """The `layers.jsonl` row of one pruned unit: kept of total, params and MACs before and after,
    its target, its relative output error and the seconds it took."""
    after = [module_cost(ctx.block.get_submodule(p)) for p in paths]
    return {
        "site": unit_name,
        "kept": kept,
        "total": total,
        "params_dense": sum(c.params for c in before),
        "params_kept": sum(c.params for c in after),
        "macs_dense": sum(c.macs for c in before),
        "macs_kept": sum(c.macs for c in after),
        "target": fraction,
        "rel_error": error,
        "seconds": time.perf_counter() - start,
        **extra,
    }
