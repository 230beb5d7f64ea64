"""`svd` through the whole pipeline on every tiny family: budgets, logits, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import shrink
from shrink.config import BudgetUnit
from shrink.planning.cost import CostModel

from ..conftest import TINY, compress_in_memory, logits, make_cfg, tiny_overrides


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("budget", [0.3, 0.6, 0.9])
def test_achieved_never_exceeds_requested(model, budget):
    done = compress_in_memory(*tiny_overrides(model), "method=svd", f"budget={budget}")
    assert 0 < done.achieved <= budget
    assert done.kept.params < done.dense.params


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("seq_len", [0, 32])
def test_macs_unit(model, seq_len):
    """svd keeps every head, so with attention-score MACs counted its linears must keep less."""
    done = compress_in_memory(
        *tiny_overrides(model), "method=svd", "budget=0.5", "budget_unit=macs", f"budget_seq_len={seq_len}"
    )
    assert 0.45 < done.achieved <= 0.5
    assert done.achieved == pytest.approx(done.kept.macs / done.dense.macs)


@pytest.mark.parametrize("model", TINY)
def test_full_budget_keeps_logits(tmp_path, model):
    from shrink.models import load_model

    done = compress_in_memory(*tiny_overrides(model), "method=svd", "budget=1.0")
    assert done.achieved == 1.0
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(dense, ids))


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("propagate", ["compressed", "dense"])
def test_save_load_reproduces_logits_and_counts(tmp_path, model, propagate):
    done = compress_in_memory(*tiny_overrides(model), "method=svd", "budget=0.4", f"propagate={propagate}")
    ids = torch.randint(0, 255, (2, 48))
    folder = done.save(tmp_path / "model")
    reloaded = shrink.load(folder)
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))
    with safe_open(folder / "model.safetensors", "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    params = sum(p.numel() for p in done.model.parameters())
    assert stored == params == sum(p.numel() for p in reloaded.parameters())


def test_a_run_records_what_it_kept(run_job, saved_logits):
    """The end-to-end path: metrics.json's counts are the stored checkpoint's."""
    metrics, folder = run_job(*tiny_overrides("tiny-llama"), "method=svd", "budget=0.4")
    reloaded = shrink.load(folder / "model")
    assert torch.equal(logits(reloaded, saved_logits["ids"]), saved_logits["logits"])
    with safe_open(folder / "model" / "model.safetensors", "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    assert stored == metrics["params_compressed"] < metrics["params_dense"]
    assert metrics["block_params_compressed"] < metrics["block_params_dense"]
    assert 0 < metrics["budget_achieved"] <= 0.4


def test_rank_rule_counts_pairs_and_biases():
    # square 64x64 without bias at half budget: r(m+n) <= 0.5 m n  ->  r = 16
    params, macs = CostModel(None, BudgetUnit.params), CostModel(None, BudgetUnit.macs)
    square, wide = nn.Linear(64, 64, bias=False), nn.Linear(64, 192)
    assert params.largest_rank(square, False, 0.5) == 16
    # with a bias the pair must also pay for it in params, not in MACs
    r = params.largest_rank(wide, True, 0.5)
    assert params.rank_pair(wide, r, True) <= 0.5 * (64 * 192 + 192) < params.rank_pair(wide, r + 1, True)
    assert r * (64 + 192) + 192 == params.rank_pair(wide, r, True)
    assert macs.largest_rank(wide, True, 0.5) == (64 * 192 // 2) // 256
    # no rank is cheaper than the dense matrix at budget 1: stays dense
    assert params.largest_rank(square, False, 1.0) is None
    assert CostModel.max_rank(square) == 31 and params.rank_pair(square, 32, False) == 64 * 64
