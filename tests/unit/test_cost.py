"""The cost model prices what a method actually removes: the unit prices a plan is made of equal
the cost of the block after the cut, on every family and in both units."""

from __future__ import annotations

import pytest
import torch

from shrink.config import BudgetUnit
from shrink.models import load_model
from shrink.models.edits import LowRankLinear, keep_outputs, set_inputs
from shrink.planning.cost import CostModel, module_cost

from ..conftest import TINY, make_cfg


def _tiny(name: str):
    return load_model(make_cfg(f"model={name}").model, torch.float32, seed=0).adapter


def _cut_heads(adapter, block, m: int, q: int) -> None:
    """Keep the first q query heads of the first m KV groups (m heads under MHA)."""
    attention = adapter.attention(block)
    n_heads, n_kv = attention.counts()
    dh, group = attention.head_dim, n_heads // n_kv
    heads = [g * group + j for g in range(m) for j in range(q)]
    dims = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in heads])
    kv_dims = torch.arange(m * dh) if n_kv != n_heads else dims
    keep_outputs(block, attention.paths.q, dims)
    keep_outputs(block, attention.paths.k, kv_dims)
    keep_outputs(block, attention.paths.v, kv_dims)
    set_inputs(block, attention.paths.o, attention.linear("o").weight[:, dims])
    attention.set_counts(len(heads), m if n_kv != n_heads else len(heads))


@pytest.mark.parametrize("unit", list(BudgetUnit))
@pytest.mark.parametrize("name", TINY)
def test_unit_prices_equal_the_cost_after_the_cut(name, unit):
    adapter = _tiny(name)
    costs = CostModel(adapter, unit, seq_len=32)
    block = adapter.blocks()[0]
    sites = {s.name: s for s in adapter.sites(block)}
    table = costs.table()
    assert sum(table.sites[0].values()) == costs.block(block).of(unit)
    assert table.total == costs.model().of(unit)

    heads = costs.heads(adapter.attention(block))
    assert heads.of(heads.n_kv, heads.group) == costs.price(block, sites["attn_in"]) + costs.price(
        block, sites["attn_out"]
    )
    m, q = max(1, heads.n_kv // 2), heads.group if heads.n_kv > 1 else max(1, heads.group // 2)
    _cut_heads(adapter, block, m, q)
    assert adapter.attention(block).counts()[0] == m * q
    assert heads.of(m, q) == costs.price(block, sites["attn_in"]) + costs.price(block, sites["attn_out"])

    ins = [block.get_submodule(p) for p in sites["mlp_in"].linears]
    down = block.get_submodule(sites["mlp_out"].linears[0])
    neurons = costs.neurons(ins, down)
    keep = torch.arange(neurons.neurons // 3)
    for path in sites["mlp_in"].linears:
        keep_outputs(block, path, keep)
    set_inputs(block, sites["mlp_out"].linears[0], down.weight[:, keep])
    assert neurons.of(len(keep)) == costs.price(block, sites["mlp_in"]) + costs.price(block, sites["mlp_out"])


def test_a_rank_r_pair_costs_r_times_m_plus_n():
    pair = LowRankLinear(64, 192, rank=5, bias=True)
    assert module_cost(pair).params == 5 * (64 + 192) + 192
    assert module_cost(pair).macs == 5 * (64 + 192)
    assert (
        CostModel(None, BudgetUnit.params).rank_pair(torch.nn.Linear(64, 192), 5, True)
        == module_cost(pair).params
    )


def test_attention_scores_count_only_in_macs_and_follow_the_heads():
    adapter = _tiny("tiny-llama")
    block = adapter.blocks()[0]
    attention = adapter.attention(block)
    assert CostModel(adapter, BudgetUnit.params, 32).scores(attention).of(BudgetUnit.params) == 0
    macs = CostModel(adapter, BudgetUnit.macs, 32)
    n_heads, _ = attention.counts()
    assert macs.scores(attention).macs == n_heads * attention.head_dim * 33  # causal: (L+1)/2 keys, ×2
    encoder = _tiny("tiny-bert")
    enc_attention = encoder.attention(encoder.blocks()[0])
    width = enc_attention.counts()[0] * enc_attention.head_dim
    assert CostModel(encoder, BudgetUnit.macs, 32).scores(enc_attention).macs == 2 * width * 32
