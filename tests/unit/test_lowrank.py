"""`rom`, `svdllm` (and `svd`) on the shared low-rank base, and the schedules every method shares."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import shrink
from shrink.errors import ShrinkError
from shrink.linalg.moments import SecondMoment
from shrink.methods import build_method

from ..conftest import TINY, compress_in_memory, logits, make_cfg, tiny_overrides

LOW_RANK = ["svd", "rom", "svdllm"]


def _layer_and_data(bias: bool = False, seed: int = 0, tokens: int = 400):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(24, 16, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 24, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(16, generator=gen))
    mix = torch.randn(24, 24, generator=gen) * torch.logspace(0, -1.5, 24)
    x = (torch.randn(tokens, 24, generator=gen) @ mix + 0.5).double()  # correlated, non-zero mean
    stats = SecondMoment(24)
    stats.update(x)
    return linear, x, stats


def _method(name: str, **cfg):
    base = {
        "name": name,
        **({"center": False} if name == "rom" else {}),
        **({"ridge": 0.0} if name == "svdllm" else {}),
    }
    return build_method(OmegaConf.create(base | cfg))


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_rom_reaches_the_optimal_rank_r_output_error(rank):
    linear, x, stats = _layer_and_data()
    left, right, bias = _method("rom").factorise(linear, stats).build(rank)
    w = linear.weight.detach().double()
    error = ((x @ (w - left @ right).T) ** 2).sum()
    optimum = (torch.linalg.svdvals(x @ w.T)[rank:] ** 2).sum()  # Eckart–Young on Y = XWᵀ
    assert float(error) == pytest.approx(float(optimum), rel=1e-8)
    assert bias is None


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_svdllm_error_is_the_discarded_singular_values_of_ws(rank):
    linear, x, stats = _layer_and_data()
    fact = _method("svdllm").factorise(linear, stats)
    left, right, _ = fact.build(rank)
    w = linear.weight.detach().double()
    error = ((x @ (w - left @ right).T) ** 2).sum() / x.shape[0]  # the moment is E[xxᵀ]
    s = torch.linalg.cholesky(stats.moment())
    discarded = (torch.linalg.svdvals(w @ s)[rank:] ** 2).sum()
    assert float(error) == pytest.approx(float(discarded), rel=1e-8)
    assert float(fact.energies[rank:].sum()) == pytest.approx(float(discarded), rel=1e-8)


def test_centred_rom_is_no_worse_and_moves_the_mean_into_a_bias():
    linear, x, stats = _layer_and_data(bias=True)
    w, b = linear.weight.detach().double(), linear.bias.detach().double()
    y = x @ w.T + b

    def err(method):
        left, right, bias = method.factorise(linear, stats).build(3)
        return float(((x @ (left @ right).T + bias - y) ** 2).sum())

    assert err(_method("rom", center=True)) < err(_method("rom", center=False))


def test_svdllm_handles_a_singular_second_moment():
    linear, x, _ = _layer_and_data()
    stats = SecondMoment(24)
    stats.update(torch.cat([x[:, :20], torch.zeros(len(x), 4, dtype=x.dtype)], dim=1))  # dead inputs
    fact = _method("svdllm").factorise(linear, stats)
    left, right, _ = fact.build(5)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert fact.notes["whitening_ridge"] > 0  # what layers.jsonl reports for this linear


@pytest.mark.parametrize("method", ["rom", "svdllm"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert"])
def test_full_budget_reproduces_outputs(tmp_path, method, model):
    from shrink.models import load_model

    done = compress_in_memory(*tiny_overrides(model), f"method={method}", "budget=1.0")
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(dense, ids))


@pytest.mark.parametrize("method", ["rom", "svdllm"])
@pytest.mark.parametrize("model", TINY)
def test_low_rank_methods_run_save_and_reload(tmp_path, method, model):
    done = compress_in_memory(*tiny_overrides(model), f"method={method}", "budget=0.6")
    assert done.achieved <= 0.6
    assert all(0 <= r["rel_error"] < 1.5 for r in done.rows)
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(done.model, ids))


SCHEDULES = ["uniform", "last_k", "first_k", "energy", "greedy"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("model", TINY)
def test_every_schedule_meets_the_budget_on_every_family(schedule, model):
    method = "id" if schedule == "greedy" and model == "tiny-opt" else "svdllm"
    extra = ["schedule.k=1"] if schedule in ("last_k", "first_k") else []
    done = compress_in_memory(
        *tiny_overrides(model), f"method={method}", f"schedule={schedule}", "budget=0.7", *extra
    )
    assert done.achieved <= 0.7


def test_last_k_compresses_only_the_last_blocks():
    rows = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=svdllm", "schedule=last_k", "schedule.k=1", "budget=0.8"
    ).rows
    assert all(r["rank"] is None for r in rows if r["block"] == 0)
    assert any(r["rank"] is not None for r in rows if r["block"] == 1)


def test_last_k_that_cannot_meet_the_budget_fails_clearly(tmp_path):
    from shrink.run.pipeline import run

    cfg = make_cfg(
        *tiny_overrides("tiny-llama"), "method=svdllm", "schedule=last_k", "schedule.k=1", "budget=0.3"
    )
    with pytest.raises(ShrinkError, match="cannot be met by compressing only the last 1 of 2 blocks"):
        run(cfg, run_dir=tmp_path / "run")
