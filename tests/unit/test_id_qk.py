"""`id` with thinner queries and keys: `method.qk_dims=true` keeps some q/k
dims (rotary pairs) of every head, shared by a KV group. The padded layers compute exactly the
thinned scores, dims that carry no score are dropped without error, the probe measures what the
thinned model computes, costs equal the cut, and budgets, GQA groups and save → load all hold."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import shrink
from shrink.errors import ShrinkError
from shrink.methods import build_method
from shrink.models import build_adapter, load_model
from shrink.models.edits import HeadPaddedLinear, thin_query_key
from shrink.planning.cost import CostModel

from ..conftest import TINY, compress_in_memory, fails, first_attention, logits, make_cfg, tiny_overrides

QK = ["method=id", "method.dims_step=4", "method.qk_dims=true"]


def test_padded_queries_equal_the_projection_with_dropped_dims_zeroed():
    gen = torch.Generator().manual_seed(0)
    full = torch.nn.Linear(10, 3 * 6)
    positions = torch.tensor([[0, 3], [1, 4], [2, 5]])
    rows = (positions + 6 * torch.arange(3)[:, None]).flatten()
    thin = HeadPaddedLinear(10, heads=3, width=2, head_dim=6, positions=positions)
    with torch.no_grad():
        thin.weight.copy_(full.weight[rows])
        thin.bias.copy_(full.bias[rows])
    x = torch.randn(5, 10, generator=gen)
    mask = torch.zeros(18, dtype=torch.bool)
    mask[rows] = True
    out = thin(x)
    assert torch.equal(out[:, ~mask], torch.zeros(5, 12))  # dropped dims are exact zeros
    assert torch.allclose(out[:, mask], full(x)[:, mask], atol=1e-6)
    assert thin.out_features == 6  # stored and priced at the thin width


def test_rotary_families_keep_whole_pairs_and_others_single_dims():
    for name, size in (("tiny-llama", 2), ("tiny-qwen2", 2), ("tiny-opt", 1), ("tiny-bert", 1)):
        adapter = load_model(make_cfg(f"model={name}").model, torch.float32, seed=0).adapter
        attention = adapter.attention(adapter.blocks()[0])
        units = attention.qk_units
        assert units is not None and {len(u) for u in units} == {size}
        assert sorted(d for u in units for d in u) == list(range(attention.head_dim))
        if size == 2:  # rotate_half turns dims i and i + head_dim/2 together
            assert all(b - a == attention.head_dim // 2 for a, b in units)


def _scoreless_key_dims(dropped: int):
    """Patch model loading so that the first `dropped` q/k units of every key head have zero key
    rows: they add nothing to any score, so dropping them changes nothing."""
    real = shrink.models.load_model

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        for block in loaded.adapter.blocks():
            attention = loaded.adapter.attention(block)
            k, dh = attention.linear("k"), attention.head_dim
            dims = torch.tensor([d for unit in attention.qk_units[:dropped] for d in unit])
            with torch.no_grad():
                for g in range(k.out_features // dh):
                    k.weight[g * dh + dims] = 0
                    if k.bias is not None:
                        k.bias[g * dh + dims] = 0
        return loaded

    return load


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_dims_without_score_are_dropped_without_error(monkeypatch, name):
    monkeypatch.setattr(shrink.models, "load_model", _scoreless_key_dims(4))
    dense = shrink.models.load_model(make_cfg(*tiny_overrides(name)).model, torch.float32, seed=0).model
    adapter = build_adapter(dense)
    block = adapter.blocks()[0]
    attention = adapter.attention(block)
    width = attention.head_dim - 4 * len(attention.qk_units[0])
    costs = CostModel(adapter, "params")
    heads = costs.heads(attention)
    sites = {s.name: costs.price(block, s) for s in adapter.sites(block)}
    # the budget that leaves every block's queries and keys exactly `width` dims (the FFN is kept)
    kept = heads.of(heads.n_kv, heads.group, None, width) + sites["mlp_in"] + sites["mlp_out"]
    done = compress_in_memory(
        *tiny_overrides(name), *QK, "method.attention=dims", "method.ffn=false", "schedule=uniform",
        f"budget={kept / sum(sites.values()) + 1e-9}",
    )  # fmt: skip
    for block, row in zip(build_adapter(done.model).blocks(), done.rows, strict=True):
        thin = build_adapter(done.model).attention(block)
        q, k = thin.linear("q"), thin.linear("k")
        assert isinstance(k, HeadPaddedLinear) and k.width == width and row["qk_width"] == width
        scoreless = {d for unit in thin.qk_units[:4] for d in unit}
        assert not scoreless & set(k.positions.flatten().tolist())  # the dims that score are kept
        group = q.heads // k.heads  # every query head keeps its key head's dims
        assert torch.equal(q.positions, k.positions.repeat_interleave(group, 0))
        assert row["rel_error"] < 1e-6
    ids = torch.randint(0, 255, (2, 48))
    assert torch.allclose(logits(done.model, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_the_probe_measures_what_the_thinned_block_computes():
    from shrink.blocks.placement import OnDevice
    from shrink.blocks.runner import Runner
    from shrink.config import Propagate
    from shrink.data import corpora as data
    from shrink.methods.id.qk import attention_output, qk_errors, qk_positions

    cfg = make_cfg(*tiny_overrides("tiny-llama"), *QK)
    method = build_method(cfg.method)

    loaded = load_model(cfg.model, torch.float32, seed=0)
    windows = data.calibration_windows("wiki", loaded.tokenizer, 4, 64, 0, cfg.model.add_bos)
    cpu = torch.device("cpu")
    costs = CostModel(loaded.adapter, "params")
    runner = Runner(loaded.adapter, windows, 2, cpu, OnDevice(cpu), costs, method.new_stats)
    ctx = next(iter(runner.blocks(Propagate.dense)))
    weights = ctx.attention.linear("o").weight.detach().to(torch.float64).norm(dim=0)
    errors = qk_errors(ctx, ctx.stats["attn_in"], weights, [8, 16], windows=4)
    assert errors[16] == 0.0 and errors[8] > 0
    dense = [attention_output(ctx, h, b) for b, h in enumerate(ctx.hidden)]
    positions = qk_positions(ctx.attention, ctx.stats["attn_in"], 8)
    paths = ctx.attention.paths
    thin_query_key(ctx.block, paths.q, paths.k, positions, 2)
    thinned = [attention_output(ctx, h, b) for b, h in enumerate(ctx.hidden)]
    num = sum((((t - z).double() * weights) ** 2).sum() for t, z in zip(thinned, dense, strict=True))
    den = sum(((z.double() * weights) ** 2).sum() for z in dense)
    assert errors[8] == pytest.approx(float(num / den), rel=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_thin_queries_and_keys_cost_what_the_cost_model_says(name):
    adapter, costs, block, attention, heads = first_attention(name)
    n_heads, n_kv = attention.counts()
    positions = torch.arange(8).repeat(n_kv, 1)
    thin_query_key(block, attention.paths.q, attention.paths.k, positions, n_heads // n_kv)
    sites = {s.name: s for s in adapter.sites(block)}
    kept = costs.price(block, sites["attn_in"]) + costs.price(block, sites["attn_out"])
    assert heads.of(n_kv, heads.group, None, 8) == kept < heads.of(n_kv, heads.group)


@pytest.mark.parametrize("model", TINY)
def test_thin_queries_and_keys_meet_the_budget_and_reload_exactly(tmp_path, model):
    done = compress_in_memory(*tiny_overrides(model), *QK, "budget=0.6")
    assert done.achieved <= 0.6
    assert any(r["qk_width"] < 16 for r in done.rows if r["site"] == "attn")
    reloaded = shrink.load(done.save(tmp_path / "model"))
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))
    for block in build_adapter(reloaded).blocks():
        k = build_adapter(reloaded).attention(block).linear("k")
        if isinstance(k, HeadPaddedLinear):
            assert k.positions is not None and k.out_features == k.heads * k.width


@pytest.mark.parametrize("extra", [[], ["method.target=dense", "method.bias=true"]])
def test_thin_queries_and_keys_at_full_size_reproduce_the_logits(extra):
    done = compress_in_memory(*tiny_overrides("tiny-llama"), *QK, *extra, "budget=1.0")
    dense = load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 48))
    assert torch.allclose(logits(done.model, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_dense_targets_refit_the_output_projection_after_thinning():
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), *QK, "method.target=dense", "schedule=uniform", "budget=0.7"
    )
    assert done.achieved <= 0.7
    assert any(r["qk_width"] < 16 for r in done.rows if r["site"] == "attn")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method.attention=heads", "method.qk_dims=true"], "method.qk_dims=true thins every head"),
        (["method.qk_dims=true", "method.qk_probe_windows=0"], "method.qk_probe_windows=0 must be"),
    ],
)
def test_bad_query_key_settings_fail_before_work(tmp_path, overrides, match):
    fails(tmp_path, "model=tiny-llama", "logger=none", "device=cpu", "method=id", *overrides, match=match)


def test_families_that_normalise_queries_refuse_thinning():
    config = Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=64,
    )  # fmt: skip
    adapter = build_adapter(Qwen3ForCausalLM(config))
    assert adapter.attention(adapter.blocks()[0]).qk_units is None
    method = build_method(make_cfg("method=id", "method.qk_dims=true").method)
    with pytest.raises(ShrinkError, match="qwen3 normalises .* set method.qk_dims=false"):
        method.check_model(adapter)
    build_method(make_cfg("method=id").method).check_model(adapter)  # off: nothing to refuse
