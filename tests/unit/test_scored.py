"""`flap` and `wanda-sp`: their scores on explicit activations, FLAP's bias compensation and global
threshold, the budget with added biases counted, dead units removed first, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import shrink
import shrink.models
from shrink.config import BudgetUnit
from shrink.linalg.moments import SecondMoment
from shrink.methods.flap import Flap, FlapMetric, channel_metric
from shrink.methods.scored import UnitScores, standardised
from shrink.methods.wanda_sp import wanda_channels
from shrink.models import build_adapter
from shrink.planning.budget import Curve, PlanInputs
from shrink.planning.cost import CostTable
from shrink.planning.schedules import threshold

from ..conftest import compress_in_memory, fails, logits, make_cfg, tiny_overrides

SCORED = ["flap", "wanda-sp"]


def _moments(x: torch.Tensor) -> SecondMoment:
    stats = SecondMoment(x.shape[1], device=torch.device("cpu"), where="test")
    stats.update(x)
    return stats


def test_scores_are_the_papers_equations_on_explicit_activations():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64) * torch.arange(1, 7) + torch.arange(6)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    stats = _moments(x)
    variance = x.var(0)  # the sample variance over calibration tokens
    square = (x * x).mean(0)
    torch.testing.assert_close(channel_metric(FlapMetric.ifv, w, stats), variance)
    torch.testing.assert_close(channel_metric(FlapMetric.wifv, w, stats), variance * (w * w).sum(0))
    torch.testing.assert_close(channel_metric(FlapMetric.wifn, w, stats), (w.abs() * square.sqrt()).mean(0))
    torch.testing.assert_close(wanda_channels(w, stats), (w.abs() * x.norm(dim=0) / len(x) ** 0.5).mean(0))
    z = standardised(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    assert float(z.mean()) == pytest.approx(0) and float(z.std()) == pytest.approx(1)


def test_bias_compensation_keeps_the_output_mean_and_reports_its_error():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=gen, dtype=torch.float64) + torch.linspace(-2, 3, 8)
    linear = nn.Linear(8, 5, dtype=torch.float64)
    stats = _moments(x)
    keep = torch.tensor([0, 2, 3, 7])
    method = Flap(make_cfg("method=flap").method)
    weight, bias, error = method._drop_inputs(linear, stats, keep)
    with torch.no_grad():
        dense, pruned = linear(x), x[:, keep] @ weight.T + bias
        exact = float(((pruned - dense) ** 2).sum() / (((dense - linear.bias) ** 2).sum()))
    torch.testing.assert_close(pruned.mean(0), dense.mean(0))
    assert error == pytest.approx(exact**0.5, rel=1e-9)


def test_unit_scores_keep_the_best_and_price_each_option():
    scores = UnitScores(torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([1.0, 3.0, 0.0, 0.0]))
    assert scores.kept(2).tolist() == [0, 2]
    options = scores.options([1, 2, 4], lambda k: 10 * k)
    assert [o.cost for o in options] == [10, 20, 40]
    assert [o.score for o in options] == [0.5, 0.0, None]  # the best unit each option removes
    assert options[1].error == pytest.approx((3 / 4) ** 0.5) and options[2].error == 0


def test_threshold_removes_the_lowest_scores_across_blocks_until_the_budget_fits():
    # two blocks of four neurons (cost 1 each); block 1's scores are all below block 0's best
    per_block = [torch.tensor([3.0, 2.5, 0.1, 2.0]), torch.tensor([0.2, 1.0, -0.5, 0.4])]
    curves = []
    for b, s in enumerate(per_block):
        options = UnitScores(s, s.abs()).options([1, 2, 3, 4], float)
        curves.append(Curve(b, "mlp", ("mlp",), 4.0, options))
    table = CostTable(BudgetUnit.params, [{"mlp": 4.0}, {"mlp": 4.0}], [0.0, 0.0])
    plan = threshold(PlanInputs(table, 0.5, curves=curves))
    # the four lowest scores (-0.5, 0.1, 0.2, 0.4) go: block 0 keeps 3, block 1 keeps 1
    assert plan.choices[0]["mlp"]["units"] == 3 and plan.choices[1]["mlp"]["units"] == 1
    whole = threshold(PlanInputs(table, 1.0, curves=curves))
    assert whole.choices[0]["mlp"]["units"] == 4 and whole.choices[1]["mlp"]["units"] == 4


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("method", SCORED)
def test_keeping_everything_reproduces_the_logits_and_budgets_hold(model, method):
    whole = compress_in_memory(*tiny_overrides(model), f"method={method}", "budget=1.0")
    pruned = compress_in_memory(*tiny_overrides(model), f"method={method}", "budget=0.6")
    ids = torch.randint(0, 255, (2, 24))
    dense = shrink.models.load_model(make_cfg(f"model={model}").model, torch.float32, seed=0).model
    assert torch.equal(logits(whole.model, ids), logits(dense, ids))
    assert 0.5 < pruned.achieved <= 0.6
    adapter = build_adapter(pruned.model)
    linears = [block.get_submodule(path) for block in adapter.blocks() for site in adapter.sites(block)
               for path in site.linears]  # fmt: skip
    assert sum(p.numel() for m in linears for p in m.parameters()) == pruned.kept.params  # biases counted
    biased = [m for m in linears if m.bias is not None]
    if model == "tiny-llama":  # FLAP's compensation adds a bias wherever it removed units, and pays for it
        cut = sum(r["kept"] < r["total"] for r in pruned.rows)
        assert cut and len(biased) == (cut if method == "flap" else 0)


def _with_dead_units(real):
    """`load_model` whose every block has FFN neuron 3 and KV group 1 silenced (their inputs of
    down_proj / o_proj are exactly zero on every token)."""

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        adapter = loaded.adapter
        for block in adapter.blocks():
            with torch.no_grad():
                for path in adapter.site_paths["mlp_in"]:
                    block.get_submodule(path).weight[3] = 0
                attention = adapter.attention(block)
                v = attention.linear("v")
                v.weight[attention.head_dim : 2 * attention.head_dim] = 0
                if v.bias is not None:
                    v.bias[attention.head_dim : 2 * attention.head_dim] = 0
        return loaded

    return load


@pytest.mark.parametrize("method", SCORED)
def test_a_neuron_and_a_kv_group_that_never_fire_go_first(monkeypatch, method):
    monkeypatch.setattr(shrink.models, "load_model", _with_dead_units(shrink.models.load_model))
    overrides = [f"method={method}", "schedule=uniform", "budget=0.5"]  # ⌊0.5·2⌋ = 1 KV group goes
    assert_dead_units_went(compress_in_memory(*tiny_overrides("tiny-llama"), *overrides))


def assert_dead_units_went(done) -> None:
    """Every block of a `_with_dead_units` model lost its dead neuron and its dead KV group."""
    adapter = build_adapter(done.model)
    for block in adapter.blocks():
        attention = adapter.attention(block)
        up = block.get_submodule(adapter.site_paths["mlp_in"][0])
        assert up.out_features < 160 and attention.counts() == (2, 1)
        assert bool((up.weight.detach().abs().sum(1) > 0).all()), "the dead neuron was kept"
        assert float(attention.linear("v").weight.detach().abs().sum()) > 0, "the dead KV group was kept"


def test_bad_inputs_fail_before_loading(tmp_path):
    message = "schedule 'threshold' compares the units' scores, which method 'id' does not give"
    fails(tmp_path, *tiny_overrides("tiny-llama"), "method=id", "schedule=threshold", match=message)
    with pytest.raises(Exception, match="metric"):
        make_cfg("method=flap", "method.metric=entropy")
    fails(
        tmp_path, *tiny_overrides("tiny-llama"), "method=flap", "method.ratio=1.2", match=r"lie in \(0, 1\)"
    )


def test_wanda_sp_under_uniform_is_a_stock_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=wanda-sp", "budget=0.7")
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] < 160
    stock = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 255, (2, 24))
    assert torch.equal(logits(stock, ids), logits(shrink.load(folder), ids))
    assert torch.equal(logits(stock, ids), logits(done.model, ids))


def test_the_reference_variance_follows_the_reference_codes_running_update():
    from shrink.methods.flap import RunningFluctuation

    gen = torch.Generator().manual_seed(2)
    sequences = torch.randn(5, 7, 3, generator=gen, dtype=torch.float64) * 2 + 1
    stats = RunningFluctuation(3, "cpu", "test")
    stats.update(sequences[:2])  # batches of windows, as the runner streams them
    stats.update(sequences[2:])
    # the recurrence as the reference writes it, one sequence at a time: the first one is only
    # averaged in, and each deviation is taken from the mean that already includes its sequence
    mean, fluctuation = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for n, seq in enumerate(sequences):
        mean = mean * n / (n + 1) + seq.mean(0) / (n + 1)
        if n:
            fluctuation = fluctuation * (n - 1) / n + ((seq - mean) ** 2).sum(0) / (n + 1)
    torch.testing.assert_close(stats.fluctuation, fluctuation)
    torch.testing.assert_close(stats.mean(), sequences.reshape(-1, 3).mean(0))
    w = torch.ones(2, 3, dtype=torch.float64)
    torch.testing.assert_close(channel_metric(FlapMetric.ifv, w, stats), fluctuation)


@pytest.mark.parametrize("schedule", ["threshold", "uniform"])
def test_flaps_pruning_ratio_sets_the_budget_it_keeps(schedule):
    """`method.ratio=0.3` (FLAP's --pruning_ratio, AL-AM or UL-UM) makes the run's budget 0.7."""
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=flap", "method.ratio=0.3", f"schedule={schedule}"
    )
    assert done.plan.budget == pytest.approx(0.7) and done.achieved <= done.plan.budget


def test_bias_compensated_flap_under_uniform_is_a_stock_llama_folder(tmp_path):
    """The biases FLAP adds to o_proj and down_proj switch on Llama's attention_bias and mlp_bias;
    zero biases fill q/k/v and gate/up, and stock transformers computes the same logits."""
    from transformers import AutoModelForCausalLM

    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=flap", "schedule=uniform", "budget=0.5")
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["attention_bias"] and config["mlp_bias"]
    stock = AutoModelForCausalLM.from_pretrained(folder)
    q = stock.model.layers[0].self_attn.q_proj
    assert q.bias is not None and not q.bias.any()
    ids = torch.randint(0, 255, (2, 16))
    assert torch.equal(logits(stock, ids), logits(done.model, ids))
    assert torch.equal(logits(shrink.load(folder), ids), logits(done.model, ids))
