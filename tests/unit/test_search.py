"""`schedule=search`: the evolutionary search over plans and its candidate edits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import shrink
from shrink.blocks.candidates import assemble, prepare, whole_option
from shrink.blocks.placement import OnDevice
from shrink.blocks.runner import Runner
from shrink.config import Propagate
from shrink.data import corpora as data
from shrink.methods import build_method
from shrink.models import load_model
from shrink.planning.search import evolve, local_options
from shrink.run.pipeline import cost_model

from ..conftest import compress_in_memory, fails, logits, make_cfg, tiny_overrides


def _table(seed: int, units: int = 8, options: int = 9):
    rng = np.random.default_rng(seed)
    costs = [np.sort(rng.uniform(1, 10, options)) for _ in range(units)]
    weights = rng.uniform(0.5, 2.0, (units, options))
    return costs, weights


def _fitness(costs, weights, calls=None):
    """A fitness that is not the sum of per-unit terms: units interact through a product."""

    def f(choice):
        if calls is not None:
            calls.append(tuple(choice))
        own = [weights[u][j] / costs[u][j] for u, j in enumerate(choice)]
        return float(sum(own) + 0.1 * np.prod([1 + x for x in own[:3]]))

    return f


@pytest.mark.parametrize("seed", range(4))
def test_search_never_exceeds_the_budget_and_never_loses_to_its_seed(seed):
    costs, weights = _table(seed)
    start = [4] * len(costs)
    allowance = sum(c[4] for c in costs) + 0.5
    ladders = local_options(costs, start, [c.max() for c in costs], 0.1, 3)
    calls = []
    result = evolve(costs, allowance, ladders, start, _fitness(costs, weights, calls), 40, rng_seed=seed)
    assert all(sum(c[j] for c, j in zip(costs, choice, strict=True)) <= allowance + 1e-9 for choice in calls)
    assert result.fitness <= result.seed_fitness == _fitness(costs, weights)(start)
    assert result.fitness == _fitness(costs, weights)(result.choice)
    assert result.evaluations == len(set(calls)) <= 40
    assert result.fitness < result.seed_fitness  # on this problem there is something to gain


def test_search_is_deterministic_for_a_seed():
    costs, weights = _table(7)
    start = [3] * len(costs)
    ladders = local_options(costs, start, [c.max() for c in costs], 0.1, 2)
    allowance = sum(c[3] for c in costs)
    runs = [
        evolve(costs, allowance, ladders, start, _fitness(costs, weights), 30, rng_seed=s) for s in (5, 5, 6)
    ]
    assert runs[0].choice == runs[1].choice and runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history or runs[0].choice != runs[2].choice


def test_ladders_hold_the_seed_and_climb_in_cost():
    costs = [np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), np.array([2.0, 2.5, 10.0])]
    ladders = local_options(costs, [2, 1], [6.0, 10.0], 1 / 6, 2)
    assert ladders[0] == [0, 1, 2, 3, 4]
    assert 1 in ladders[1] and all(
        costs[1][a] < costs[1][b] for a, b in zip(ladders[1], ladders[1][1:], strict=False)
    )


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
def test_assembled_candidates_equal_the_block_compressed_with_both_choices(model):
    """The candidate cache reproduces each edit exactly: a block assembled from the attention's and
    the FFN's candidates computes what the method gives the block with both choices at once."""
    cfg = make_cfg(*tiny_overrides(model), "method=id", "schedule=search")
    loaded = load_model(cfg.model, torch.float32, seed=0)
    method = build_method(cfg.method)
    costs = cost_model(cfg, loaded.adapter)
    windows = data.calibration_windows(cfg.calib.corpus, loaded.tokenizer, 4, 32, 0)
    cpu = torch.device("cpu")
    runner = Runner(loaded.adapter, windows, 2, cpu, OnDevice(cpu), costs, method.new_stats)
    ctx = next(iter(runner.blocks(Propagate.dense, desc="test")))
    curves = method.profile(ctx)
    picks = [min(range(len(c.options)), key=lambda j: c.options[j].cost) for c in curves]  # the cheapest
    assert all(j != whole_option(c) for c, j in zip(curves, picks, strict=True))
    edits = prepare(
        ctx, loaded.adapter, method, [(c, [j, whole_option(c)]) for c, j in zip(curves, picks, strict=True)]
    )
    dense = copy.deepcopy(ctx.block)
    assembled = assemble(dense, loaded.adapter, [e[j] for e, j in zip(edits, picks, strict=True)])

    direct = copy.deepcopy(dense)
    choices = {c.name: {**c.options[j].choice, "sites": c.sites} for c, j in zip(curves, picks, strict=True)}
    targets = {
        site: c.options[j].cost / c.dense_cost for c, j in zip(curves, picks, strict=True) for site in c.sites
    }
    from dataclasses import replace

    method.compress_block(
        replace(
            ctx, block=direct, choices=choices, targets=targets, attention=loaded.adapter.attention(direct)
        )
    )
    run = loaded.adapter.run_block
    for h, a, k in zip(ctx.hidden, ctx.args, ctx.kwargs, strict=True):
        assert torch.equal(run(assembled, h, a, k), run(direct, h, a, k))
    assert all(e[whole_option(c)] == {} for e, c in zip(edits, curves, strict=True))  # whole: nothing
    for name, p in dense.named_parameters():  # the dense block the candidates came from is untouched
        assert torch.equal(p, ctx.block.get_parameter(name))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_searched_plans_meet_the_budget_and_budget_one_is_the_dense_model(model):
    done = compress_in_memory(*tiny_overrides(model), "method=id", "schedule=search", "budget=0.6")
    assert done.achieved <= 0.6
    whole = compress_in_memory(*tiny_overrides(model), "method=id", "schedule=search", "budget=1.0")
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(whole.model, ids), logits(dense, ids))


def test_held_aside_windows_miss_the_calibration_windows():
    tok = load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=0).tokenizer
    stream = data.token_stream("wiki", "calib", tok)
    calib = data.calibration_windows("wiki", tok, 16, 64, seed=3)
    starts = torch.randint(0, stream.numel() - 64, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    assert torch.equal(calib, torch.stack([stream[s : s + 64] for s in starts]))
    held = data.held_aside_starts(stream.numel(), 4, 64, 16, seed=3)
    assert len(held) == 4
    assert all(abs(h - s) >= 64 for h in held for s in starts)
    assert all(abs(a - b) >= 64 for i, a in enumerate(held) for b in held[i + 1 :])
    windows = data.held_aside_windows("wiki", tok, 4, 64, 16, seed=3)
    assert torch.equal(windows, torch.stack([stream[h : h + 64] for h in held]))
    assert data.held_aside_starts(200, 4, 64, 2, seed=0) == []  # no room


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stream=true"], "schedule=search scores each plan"),
        (["schedule.evaluations=0"], "schedule.evaluations=0"),
        (["schedule.step=0"], "schedule.step=0"),
    ],
)
def test_bad_search_settings_fail_before_loading(tmp_path, overrides, message):
    fails(tmp_path, *tiny_overrides("tiny-llama"), "method=id", "schedule=search", *overrides, match=message)


def test_a_searched_run_records_its_search_and_reloads(run_job):
    metrics, folder = run_job(*tiny_overrides("tiny-llama"), "method=id", "schedule=search", "budget=0.6")
    search = metrics["search"]
    assert search["kl"] <= search["seed_kl"] and 1 <= search["evaluations"] <= 48
    assert metrics["budget_achieved"] <= 0.6 and metrics["schedule"] == "search"
    reloaded = shrink.load(folder / "model")
    assert reloaded is not None


@pytest.mark.parametrize("method", ["svdllm", "flap"])
def test_other_methods_with_profiles_search_within_the_budget(method):
    """A low-rank method's units are single matrices sharing a site; a scored pruner's are heads
    and neurons: each unit's candidates replace only what it edits."""
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"),
        f"method={method}",
        "schedule=search",
        "schedule.error=unit",
        "budget=0.6",
    )
    assert done.achieved <= 0.6 + 1e-9
