"""`id`'s fold switches: the affine fold (`method.bias`) and dense targets
(`method.target=dense`) solve the least-squares problems they claim, from streamed moments, and
keep every property of the plain fold (exact at full size, budget met with the bias counted,
save → load exact)."""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.linalg.decompositions import fold, fold_error
from shrink.linalg.moments import CrossMoment, SecondMoment
from shrink.models import load_model

from ..conftest import compress_in_memory, logits, make_cfg, tiny_overrides

SWITCHES = [["method.bias=true"], ["method.target=dense"], ["method.bias=true", "method.target=dense"]]


def _streams(tokens: int = 600, n: int = 12, seed: int = 0):
    """x: what a pruned block reads (correlated, non-zero mean); y: the dense activations, x plus
    an error that earlier blocks left."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -1, n, dtype=torch.float64
    )
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix + 0.7
    y = x + 0.1 * torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix - 0.05
    stats, cross = SecondMoment(n), CrossMoment(n)
    for part in range(3):  # streamed in batches, as the runner does
        rows = slice(part * tokens // 3, (part + 1) * tokens // 3)
        stats.update(x[rows])
        cross.update(x[rows], y[rows])
    return x, y, stats, cross


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_the_fold_is_the_least_squares_fit_on_explicit_activations(affine, dense):
    x, y, stats, cross = _streams()
    keep = torch.tensor([0, 2, 3, 7, 9])
    got = fold(stats, keep, ridge=0.0, affine=affine, cross=cross if dense else None)
    target = y if dense else x
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1) if affine else x[:, keep]
    solution = torch.linalg.lstsq(design, target).solution
    t = solution[: len(keep)]
    if not dense:  # kept columns pass through unchanged
        assert torch.allclose(t[:, keep], torch.eye(len(keep), dtype=t.dtype), atol=1e-8)
    assert torch.allclose(got.t, t, atol=1e-7)
    if affine:
        assert torch.allclose(got.shift, solution[-1], atol=1e-7)
    else:
        assert got.shift is None

    # the reported error is the one measured on the explicit activations
    weight = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    folded = weight @ got.t.T
    shift = weight @ got.shift if affine else 0.0
    direct = (x[:, keep] @ folded.T + shift - target @ weight.T).norm() / (target @ weight.T).norm()
    assert fold_error(weight, folded, keep, got.shift, stats, cross if dense else None) == pytest.approx(
        float(direct), rel=1e-6
    )


def test_each_switch_lowers_the_error_it_targets():
    """The affine fold fits at least as well as the linear one; against dense targets the
    error-correcting fold beats STAT's fold measured on the same targets."""
    x, y, stats, cross = _streams(seed=1)
    keep = torch.tensor([1, 4, 5, 8])
    weight = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def error(affine: bool, fit_dense: bool, judge_dense: bool) -> float:
        f = fold(stats, keep, 1e-6, affine, cross if fit_dense else None)
        return fold_error(weight, weight @ f.t.T, keep, f.shift, stats, cross if judge_dense else None)

    assert error(True, False, False) < error(False, False, False)
    assert error(False, True, True) < error(False, False, True)
    assert error(True, True, True) < error(False, True, True)


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert"])
def test_keeping_everything_reproduces_logits(tmp_path, model, switches):
    done = compress_in_memory(*tiny_overrides(model), "method=id", "budget=1.0", *switches)
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(done.model, ids), logits(dense, ids))
    assert done.achieved == 1.0


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert", "tiny-qwen2", "tiny-distilbert"])
def test_budget_met_with_the_bias_counted_and_reloads(tmp_path, model, switches):
    done = compress_in_memory(*tiny_overrides(model), "method=id", "budget=0.6", *switches)
    assert done.achieved <= 0.6
    ids = torch.randint(0, 255, (2, 48))
    reloaded = shrink.load(done.save(tmp_path / "model"))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))
    if "method.bias=true" in switches and model == "tiny-llama":  # Llama's down/o have no bias
        for block in reloaded.model.layers:  # a fold that dropped inputs added one
            for linear, dense_in in ((block.mlp.down_proj, 160), (block.self_attn.o_proj, 64)):
                assert (linear.bias is not None) == (linear.in_features < dense_in)


@pytest.mark.parametrize("switches", SWITCHES)
def test_greedy_plans_with_the_switches(switches):
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=id", "schedule=greedy", "budget=0.6", *switches
    )
    assert done.achieved <= 0.6


def test_dense_targets_with_dense_propagation_fail_before_loading(tmp_path):
    from shrink.errors import ShrinkError
    from shrink.run.pipeline import run

    cfg = make_cfg(*tiny_overrides("tiny-llama"), "method=id", "method.target=dense", "propagate=dense")
    with pytest.raises(ShrinkError, match="method.target=dense fits the dense model's activations"):
        run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("affine", [False, True])
def test_dense_targets_equal_to_the_inputs_give_the_plain_fold(affine):
    """The ridge pulls kept columns towards passing through (not towards 0, which silences
    low-variance kept units): with no error from below, the error-correcting fold is STAT's."""
    x, _, stats, _ = _streams(seed=2)
    same = CrossMoment(x.shape[1])
    same.update(x, x)
    keep = torch.tensor([0, 3, 5, 6, 10])
    plain, dense = fold(stats, keep, 0.05, affine), fold(stats, keep, 0.05, affine, same)
    assert torch.allclose(dense.t, plain.t, atol=1e-9)
    if affine:
        assert torch.allclose(dense.shift, plain.shift, atol=1e-9)


def test_float32_batch_grams_match_float64_and_keep_the_id():
    """id's default `batch_gram_fp32`: per-batch XᵀX in float32 summed in float64 stays within
    1e-5 of the float64 moments (with a few rows 100× louder, as massive activations are), picks
    the same leading pivots."""
    import torch

    from shrink.linalg.decompositions import pivoted_cholesky
    from shrink.linalg.moments import SecondMoment

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(256, 48, generator=gen) @ torch.randn(48, 48, generator=gen) for _ in range(4)]
    batches[1][0] *= 100
    fast, exact = SecondMoment(48, batch_dtype=torch.float32), SecondMoment(48)
    for x in batches:
        fast.update(x)
        exact.update(x)
    x64 = torch.cat(batches).to(torch.float64)
    assert torch.allclose(exact.xtx, x64.T @ x64, rtol=1e-12, atol=1e-9)
    scale = float(torch.diagonal(exact.xtx).max())
    assert float((fast.xtx - exact.xtx).abs().max()) < 1e-5 * scale
    assert torch.allclose(fast.sum, exact.sum) and fast.count == exact.count
    assert list(pivoted_cholesky(fast.xtx, 20).order) == list(pivoted_cholesky(exact.xtx, 20).order)
