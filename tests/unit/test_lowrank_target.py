"""`rom` and `svdllm` with dense targets: each left factor is refitted in
closed form so the pair reproduces the dense layer on the dense model's inputs. The refit is the
least-squares solution on explicit activations, leaves an already optimal factor alone when there
is no error below, never fits the dense target worse, and runs end to end."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import shrink
from shrink.linalg.decompositions import fold_error, refit_left
from shrink.linalg.moments import CrossMoment, SecondMoment
from shrink.methods import build_method

from ..conftest import FAST, compress_in_memory, fails, logits, tiny_overrides


def _streams(tokens: int = 500, n: int = 20, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -1, n, dtype=torch.float64
    )
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix
    y = x + 0.2 * torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix
    weight = torch.randn(12, n, generator=gen, dtype=torch.float64)
    return x, y, weight


def _cross(x, y) -> CrossMoment:
    cross = CrossMoment(x.shape[1])
    for part in torch.chunk(torch.arange(len(x)), 3):  # streamed in batches
        cross.update(x[part], y[part])
    return cross


def test_the_refit_is_least_squares_on_explicit_activations():
    x, y, weight = _streams()
    right = torch.randn(5, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    left0 = torch.randn(12, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cross = _cross(x, y)
    got = refit_left(weight, left0, right, cross, ridge=0.0)
    direct = torch.linalg.lstsq(x @ right.T, y @ weight.T).solution.T
    assert torch.allclose(got, direct, atol=1e-8)
    every = torch.arange(20)
    # it fits the dense target at least as well as the factor it started from
    assert fold_error(weight, got @ right, every, None, cross.x, cross) < fold_error(
        weight, left0 @ right, every, None, cross.x, cross
    )


@pytest.mark.parametrize("name", ["rom", "svdllm"])
def test_without_error_below_the_refit_keeps_the_factor(name):
    """y = x: rom's and svdllm's left factors are already least squares for their right factors."""
    x, _, weight = _streams(seed=3)
    stats = SecondMoment(20)
    stats.update(x)
    linear = torch.nn.Linear(20, 12, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(weight)
    cfg = {"name": name, **({"center": False} if name == "rom" else {"ridge": 0.0})}
    left, right, _ = build_method(OmegaConf.create(cfg)).factorise(linear, stats).build(6)
    assert torch.allclose(refit_left(weight, left, right, _cross(x, x), ridge=1e-2), left, atol=1e-7)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("method", ["rom", "svdllm"])
def test_dense_targets_run_meet_the_budget_and_reload(tmp_path, model, method):
    done = compress_in_memory(*tiny_overrides(model), f"method={method}", "method.target=dense", "budget=0.6")
    assert done.achieved <= 0.6
    assert all(r["rel_error"] >= 0 for r in done.rows if r["rank"] is not None)
    reloaded = shrink.load(done.save(tmp_path / "model"))
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method=svdllm", "method.target=dense", "propagate=dense"], "with propagate=dense"),
        (["method=rom", "method.center=true", "method.target=dense"], "center=true"),
    ],
)
def test_bad_dense_target_settings_fail_before_work(tmp_path, overrides, match):
    fails(tmp_path, "model=tiny-llama", *FAST, *overrides, match=match)
