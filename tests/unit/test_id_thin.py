"""`id` with thinner heads: `method.attention=dims|both` keeps some value
dimensions of each KV head (v rows, o columns) instead of, or besides, dropping whole heads. The
thinned layers compute exactly the thin attention, an exactly low-rank value head is thinned
without error, costs equal the cut, and budgets, GQA groups and save → load all hold."""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.config import BudgetUnit
from shrink.errors import ShrinkError
from shrink.linalg.decompositions import balanced, block_pivoted_cholesky, unit_pivoted_cholesky
from shrink.models import build_adapter, load_model
from shrink.models.edits import HeadPaddedLinear, HeadSlicedLinear, thin_heads
from shrink.planning.budget import Curve, Option, PlanInputs
from shrink.planning.cost import CostModel, CostTable
from shrink.planning.schedules import make_plan

from ..conftest import FAST, TINY, compress_in_memory, first_attention, logits, make_cfg, tiny_overrides

THIN = ["method=id", "method.dims_step=4"]


def test_thin_value_and_output_projections_compute_the_thin_attention():
    gen = torch.Generator().manual_seed(0)
    v = HeadPaddedLinear(10, heads=2, width=3, head_dim=5)
    o = HeadSlicedLinear(heads=4, width=3, head_dim=5, out_features=7)
    x = torch.randn(6, 10, generator=gen)
    out = v(x).view(6, 2, 5)
    assert torch.equal(out[..., 3:], torch.zeros(6, 2, 2))  # padded dims are zeros
    assert torch.allclose(out[..., :3].reshape(6, 6), x @ v.weight.T + v.bias)
    z = torch.randn(6, 4 * 5, generator=gen)
    kept = z.view(6, 4, 5)[..., :3].reshape(6, 12)
    assert torch.allclose(o(z), kept @ o.weight.T + o.bias)
    assert o.in_features == 12 and v.out_features == 6  # stored and priced at the thin width


def _gram(n: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn(400, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    return z.T @ z


def test_unit_selection_generalises_the_block_selection_and_balances_groups():
    gram = _gram(24)
    blocks = block_pivoted_cholesky(gram, 4, 6)
    units = unit_pivoted_cholesky(gram, torch.arange(24).view(6, 4), 6)
    assert list(blocks.order) == list(units.order)
    assert torch.allclose(blocks.remaining, units.remaining)

    # 3 groups of 4 units of 2 columns each; columns 0-5 belong to no unit (a dropped head)
    units = torch.arange(6, 30).view(12, 2)
    groups = torch.arange(12) // 4
    picked = unit_pivoted_cholesky(_gram(30, 1), units, 12, balanced(groups))
    for rounds in range(1, 5):
        counts = torch.bincount(groups[torch.tensor(picked.order[: 3 * rounds])], minlength=3)
        assert counts.tolist() == [rounds] * 3
    assert (picked.remaining[1:] <= picked.remaining[:-1] + 1e-9).all()
    # every unit picked: only the columns outside the units are left, as their Schur complement
    g = _gram(30, 1)
    kept = torch.arange(6, 30)
    schur = g[:6, :6] - g[:6, kept] @ torch.linalg.solve(g[kept][:, kept], g[kept, :6])
    assert picked.remaining[-1] == pytest.approx(float(torch.trace(schur)), rel=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_thin_heads_cost_what_the_cost_model_says(name):
    adapter, costs, block, attention, heads = first_attention(name)
    n_heads, n_kv = attention.counts()
    dh, width = attention.head_dim, 4
    v_rows = torch.cat([g * dh + torch.arange(width) for g in range(n_kv)])
    o_cols = torch.cat([h * dh + torch.arange(width) for h in range(n_heads)])
    thin_heads(
        block,
        attention.paths.v,
        attention.paths.o,
        v_rows,
        attention.linear("o").weight[:, o_cols],
        None,
        n_kv,
        n_heads,
        width,
        dh,
    )
    sites = {s.name: s for s in adapter.sites(block)}
    kept = costs.price(block, sites["attn_in"]) + costs.price(block, sites["attn_out"])
    assert heads.of(n_kv, heads.group, width) == kept < heads.of(n_kv, heads.group)


def _low_rank_values(width: int):
    """Patch model loading so that every KV head's value rows span only `width` dimensions: then
    V_g = V_g[:, J] T exactly for any `width` independent dims J, and thinning loses nothing."""
    real = shrink.models.load_model

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for block in loaded.adapter.blocks():
            attention = loaded.adapter.attention(block)
            v = attention.linear("v")
            dh = attention.head_dim
            with torch.no_grad():
                for g in range(v.out_features // dh):
                    rows = v.weight[g * dh : (g + 1) * dh]
                    mix = torch.randn(dh - width, width, generator=gen) / width**0.5
                    rows[width:] = mix @ rows[:width]
                    if v.bias is not None:
                        v.bias[g * dh + width : (g + 1) * dh] = mix @ v.bias[g * dh : g * dh + width]
        return loaded

    return load


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_an_exactly_low_rank_value_head_is_thinned_without_error(monkeypatch, tmp_path, name):
    width = 8
    monkeypatch.setattr(shrink.models, "load_model", _low_rank_values(width))
    dense = shrink.models.load_model(make_cfg(*tiny_overrides(name)).model, torch.float32, seed=0).model
    adapter = build_adapter(dense)
    costs = CostModel(adapter, "params")
    block = adapter.blocks()[0]
    heads = costs.heads(adapter.attention(block))
    sites = {s.name: costs.price(block, s) for s in adapter.sites(block)}
    # the budget that leaves every block's attention exactly `width` value dims (the FFN is kept)
    budget = (heads.of(heads.n_kv, heads.group, width) + sites["mlp_in"] + sites["mlp_out"]) / sum(
        sites.values()
    )
    done = compress_in_memory(
        *tiny_overrides(name),
        *THIN,
        "method.attention=dims",
        "method.ffn=false",
        "method.ridge=1e-9",
        "method.ridge_cv=0",  # the fixed, near-zero ridge: the grid's smallest would show
        "method.batch_gram_fp32=false",  # an exactly singular Gram: float32 rounding would show
        "schedule=uniform",
        f"budget={budget + 1e-9}",
    )
    ids = torch.randint(0, 255, (2, 48))
    for block in build_adapter(done.model).blocks():
        v = build_adapter(done.model).attention(block).linear("v")
        assert isinstance(v, HeadPaddedLinear) and v.width == width
    assert torch.allclose(logits(done.model, ids), logits(dense, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("attention", ["dims", "both"])
def test_thinned_models_meet_the_budget_and_reload_exactly(tmp_path, model, attention):
    done = compress_in_memory(*tiny_overrides(model), *THIN, f"method.attention={attention}", "budget=0.6")
    assert done.achieved <= 0.6
    reloaded = shrink.load(done.save(tmp_path / "model"))
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))
    adapter = build_adapter(reloaded)
    for block, row in zip(adapter.blocks(), [r for r in done.rows if r["site"] == "attn"], strict=True):
        attention_ = adapter.attention(block)
        n_heads, n_kv = attention_.counts()
        assert n_heads % n_kv == 0
        v, o = attention_.linear("v"), attention_.linear("o")
        width = row["v_width"]
        assert v.out_features == n_kv * width and o.in_features == n_heads * width
        if attention == "dims":
            assert n_heads == row["total"]  # every head survives
    if attention == "dims":
        assert any(r["v_width"] < 16 for r in done.rows if r["site"] == "attn")
    params = sum(p.numel() for p in reloaded.parameters())
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    assert params < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert"])
def test_thin_heads_at_full_size_reproduce_the_logits(model):
    done = compress_in_memory(*tiny_overrides(model), *THIN, "method.attention=both", "budget=1.0")
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 48))
    assert torch.allclose(logits(done.model, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)


def test_the_greedy_plan_chooses_value_widths():
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"),
        *THIN,
        "method.attention=both",
        "schedule=greedy-residual",
        "budget=0.5",
    )
    assert done.achieved <= 0.5
    choices = [c["attn"] for c in done.plan.choices.values() if "attn" in c]
    assert choices and all("v_width" in c for c in choices)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method.attention=dims", "method.selection=sketch_qr"], "method.attention=dims selects value dims"),
        (["method.attention=both", "method.heads=false"], "method.attention=both edits attention"),
        (["method.attention=dims", "method.dims_step=0"], "method.dims_step=0 must be a positive"),
    ],
)
def test_bad_attention_settings_fail_before_work(tmp_path, overrides, match):
    from ..conftest import fails

    fails(tmp_path, "model=tiny-llama", *FAST, "method=id", *overrides, match=match)


def _reserve_curves() -> list[Curve]:
    """Two units of dense cost 10: options down to 6 are preferred, cheaper ones are reserves."""
    options = [
        Option(10, 0.0, {"k": 10}),
        Option(8, 0.1, {"k": 8}),
        Option(6, 0.3, {"k": 6}),
        Option(4, 0.05, {"k": 4}, reserve=True),  # looks better than 6, but is a last resort
        Option(2, 0.5, {"k": 2}, reserve=True),
    ]
    return [Curve(b, "mlp", ("mlp",), 10, options) for b in range(2)]


@pytest.mark.parametrize("name", ["greedy", "energy"])
def test_schedules_use_reserve_options_only_when_the_budget_needs_them(name):
    curves = _reserve_curves()
    table = CostTable(BudgetUnit.params, [{"mlp": 10.0}, {"mlp": 10.0}], [0.0, 0.0])
    reachable = make_plan(name, PlanInputs(table, 0.7, curves=curves))
    assert all(c["mlp"]["k"] >= 6 for c in reachable.choices.values())
    needs = make_plan(name, PlanInputs(table, 0.5, curves=curves))
    kept = [c["mlp"]["k"] for c in needs.choices.values()]
    assert sum(kept) <= 10 and min(kept) < 6


def test_auto_thins_values_and_keeps_every_head_while_it_can():
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=id", "method.dims_step=4", "schedule=uniform", "budget=0.8"
    )
    attn = [r for r in done.rows if r["site"] == "attn"]
    assert all(r["kept"] == r["total"] for r in attn)
    assert any(r["v_width"] < 16 for r in attn)


def test_auto_drops_heads_only_below_the_reach_of_thinning():
    low = ["method=id", "budget=0.4"]
    with pytest.raises(ShrinkError, match="budget 0.4 cannot be met by schedule 'greedy-residual'"):
        compress_in_memory(*tiny_overrides("tiny-llama"), *low, "method.attention=dims")
    done = compress_in_memory(*tiny_overrides("tiny-llama"), *low)  # auto, the default
    assert done.achieved <= 0.4
    assert any(r["kept"] < r["total"] for r in done.rows if r["site"] == "attn")


def test_thin_heads_carry_the_affine_fold_bias_and_reload(tmp_path):
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), *THIN, "method.attention=dims", "method.bias=true",
        "schedule=uniform", "budget=0.8",
    )  # fmt: skip
    assert done.achieved <= 0.8
    reloaded = shrink.load(done.save(tmp_path / "model"))
    for block in reloaded.model.layers:
        o = block.self_attn.o_proj
        assert isinstance(o, HeadSlicedLinear) and o.bias is not None
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))
