"""`llm-pruner`: the gradient pass's saliences against autograd on the whole loss, the coupled
structures' importance, the `span` schedule, and the run-level guarantees (identity at budget 1,
budget held, dead units first, bad inputs refused)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import shrink
import shrink.models
from shrink.blocks.gradients import Saliences, taylor_saliences
from shrink.config import BudgetUnit
from shrink.data import corpora as data
from shrink.errors import ShrinkError
from shrink.methods.llm_pruner import LLMPruner, Taylor
from shrink.planning.budget import PlanInputs
from shrink.planning.cost import CostTable
from shrink.planning.fixed import span

from ..conftest import compress_in_memory, fails, logits, make_cfg, tiny_overrides
from .test_scored import _with_dead_units, assert_dead_units_went

WHOLE = ["method=llm-pruner", "schedule.dense_first=0", "schedule.dense_last=0"]


def _loaded(model: str = "tiny-llama"):
    cfg = make_cfg(*tiny_overrides(model))
    loaded = shrink.models.load_model(cfg.model, torch.float32, seed=0)
    windows = data.calibration_windows(
        cfg.calib.corpus, loaded.tokenizer, cfg.calib.nsamples, cfg.calib.seq_len, cfg.seed, cfg.model.add_bos
    )
    return loaded, windows


def test_saliences_are_weight_times_the_gradient_of_the_whole_sets_mean_loss():
    loaded, windows = _loaded()
    adapter, model = loaded.adapter, loaded.model
    flags = [p.requires_grad for p in model.parameters()]
    block = adapter.blocks()[1]
    paths = [p for site in adapter.sites(block) for p in site.linears]
    weights = [block.get_submodule(p).weight for p in paths]
    for w in weights:
        w.requires_grad_(True)
    with torch.enable_grad():
        out = model(input_ids=windows, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), windows[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, weights)
        for w in weights:
            w.requires_grad_(False)  # as loaded: inference only
    by_one = taylor_saliences(adapter, windows, 1, torch.device("cpu"))
    by_three = taylor_saliences(adapter, windows, 3, torch.device("cpu"))  # an uneven last batch
    for path, grad in zip(paths, grads, strict=True):
        expected = Saliences.of(block.get_submodule(path).weight, grad)
        for got in (by_one[1][path], by_three[1][path]):
            for field in ("rows_abs", "cols_abs", "rows", "cols"):
                torch.testing.assert_close(
                    getattr(got, field), getattr(expected, field), rtol=1e-4, atol=1e-9
                )
    # the pass leaves the model as it found it
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_a_kv_group_scores_its_own_heads_and_a_neuron_its_rows_and_column():
    loaded, windows = _loaded()
    adapter = loaded.adapter
    saliences = taylor_saliences(adapter, windows, 4, torch.device("cpu"))
    block = adapter.blocks()[0]
    method = LLMPruner(make_cfg(*WHOLE).method)

    sites = {site.name: site for site in adapter.sites(block)}
    ctx = SimpleNamespace(  # what block_scores reads of a BlockContext
        index=0, attention=adapter.attention(block), saliences=saliences[0], site=sites.__getitem__
    )
    scores = method.block_scores(ctx)
    s = saliences[0]
    dh = ctx.attention.head_dim  # 4 query heads in 2 KV groups: group g has heads 2g, 2g+1
    for g in range(2):
        kv, q = slice(g * dh, (g + 1) * dh), slice(2 * g * dh, (2 * g + 2) * dh)
        want = s["self_attn.k_proj"].rows_abs[kv].sum() + s["self_attn.v_proj"].rows_abs[kv].sum()
        want += s["self_attn.q_proj"].rows_abs[q].sum() + s["self_attn.o_proj"].cols_abs[q].sum()
        assert float(scores.groups.score[g]) == pytest.approx(float(want), rel=1e-12)
    neurons = s["mlp.gate_proj"].rows_abs + s["mlp.up_proj"].rows_abs + s["mlp.down_proj"].cols_abs
    torch.testing.assert_close(scores.neurons.score, neurons)
    method.cfg.taylor = Taylor.vectorize.value
    vectorized = method.block_scores(ctx).neurons.score
    torch.testing.assert_close(
        vectorized,
        s["mlp.gate_proj"].rows.abs() + s["mlp.up_proj"].rows.abs() + s["mlp.down_proj"].cols.abs(),
    )


def test_span_keeps_the_ends_dense_and_the_middle_at_one_fraction():
    table = CostTable(BudgetUnit.params, [{"a": 10.0, "b": 10.0}] * 5, [0.0] * 5)
    plan = span(PlanInputs(table, 0.7, dense_ends=(1, 1)))
    assert [plan.targets[i]["a"] for i in (0, 4)] == [1.0, 1.0]
    middle = {plan.targets[i]["a"] for i in (1, 2, 3)}
    assert len(middle) == 1 and middle.pop() == pytest.approx((0.7 * 5 - 2) / 3)
    with pytest.raises(ShrinkError, match="dense_first=3 and dense_last=2 must"):
        span(PlanInputs(table, 0.7, dense_ends=(3, 2)))
    with pytest.raises(ShrinkError, match="the other blocks alone keep 0.800"):
        span(PlanInputs(table, 0.7, dense_ends=(2, 2)))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
def test_keeping_everything_reproduces_the_logits_and_budgets_hold(model):
    whole = compress_in_memory(*tiny_overrides(model), *WHOLE, "budget=1.0")
    pruned = compress_in_memory(*tiny_overrides(model), *WHOLE, "budget=0.6")
    ids = torch.randint(0, 255, (2, 24))
    dense = shrink.models.load_model(make_cfg(f"model={model}").model, torch.float32, seed=0).model
    assert torch.equal(logits(whole.model, ids), logits(dense, ids))
    assert 0.5 < pruned.achieved <= 0.6
    assert all(r["kept"] < r["total"] for r in pruned.rows if r["site"] == "mlp")
    edge = compress_in_memory(*tiny_overrides(model), "method=llm-pruner", "schedule.dense_first=1",
                              "schedule.dense_last=0", "budget=0.7")  # fmt: skip
    assert [r["kept"] == r["total"] for r in edge.rows if r["site"] == "mlp"] == [True, False]
    global_ = compress_in_memory(
        *tiny_overrides(model), "method=llm-pruner", "schedule=threshold", "budget=0.6"
    )
    assert global_.achieved <= 0.6


def test_a_neuron_and_a_kv_group_that_never_fire_go_first(monkeypatch):
    """Zero weights have zero salience, and so do the weights that read only zeros."""
    monkeypatch.setattr(shrink.models, "load_model", _with_dead_units(shrink.models.load_model))
    # ⌊0.5·2⌋ = 1 KV group goes
    assert_dead_units_went(compress_in_memory(*tiny_overrides("tiny-llama"), *WHOLE, "budget=0.5"))


def test_the_ratio_knob_keeps_the_reference_counts_and_sets_the_budget():
    """`method.ratio=0.5` on tiny-llama (2 KV groups of 64 key channels, 160 neurons): the
    reference removes 128 − ⌊128·0.5⌋ = 64 channels, one group, and keeps ⌊160·0.5⌋ = 80
    neurons; the run's budget is what that keeps."""
    done = compress_in_memory(*tiny_overrides("tiny-llama"), *WHOLE, "method.ratio=0.5")
    assert [(r["site"], r["kept"]) for r in done.rows] == [("attn", 2), ("mlp", 80)] * 2
    assert done.achieved == pytest.approx(done.plan.budget, rel=1e-9)
    edge = compress_in_memory(*tiny_overrides("tiny-llama"), "method=llm-pruner", "schedule.dense_first=1",
                              "schedule.dense_last=0", "method.ratio=0.5")  # fmt: skip
    kept = [(r["site"], r["kept"]) for r in edge.rows]
    assert kept == [("attn", 4), ("mlp", 160), ("attn", 2), ("mlp", 80)]


def test_bad_inputs_fail_clearly(tmp_path):
    fails(tmp_path, *tiny_overrides("tiny-llama"), *WHOLE, "stream=true",
          match="runs the calibration loss backward through the whole model")  # fmt: skip
    too_few = "must be ≥ 0 and leave at least one"  # the default span leaves 4 + 2 blocks dense
    fails(tmp_path, *tiny_overrides("tiny-llama"), "method=llm-pruner", match=too_few)
    with pytest.raises(ShrinkError, match="model family 'bert' is an encoder"):
        compress_in_memory(*tiny_overrides("tiny-bert"), *WHOLE, "budget=0.8")
    with pytest.raises(Exception, match="taylor"):
        make_cfg("method=llm-pruner", "method.taylor=param_second")
    tiny = tiny_overrides("tiny-llama")
    fails(tmp_path, *tiny, *WHOLE, "method.ratio=1.5", match="method.ratio=1.5 must lie in")
    span_only = "method.ratio is LLM-Pruner's ratio for the blocks schedule=span prunes"
    fails(tmp_path, *tiny, "method=llm-pruner", "schedule=uniform", "method.ratio=0.5", match=span_only)
