"""`id` (STAT): exactness at k = all, GQA constraints, selection paths, and ID quality."""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.linalg.decompositions import (
    block_pivoted_cholesky,
    column_major,
    interpolation_matrix,
    pivoted_cholesky,
    pivoted_qr,
)
from shrink.models import build_adapter, load_model

from ..conftest import TINY, compress_in_memory, logits, make_cfg, tiny_overrides


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert", "tiny-distilbert"])
def test_keeping_everything_reproduces_logits(tmp_path, model):
    """Budget 1 runs the whole ID path with k = n: T = I, so the model must not change."""
    done = compress_in_memory(*tiny_overrides(model), "method=id", "budget=1.0")
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 48))
    reloaded = shrink.load(done.save(tmp_path / "model"))
    assert torch.allclose(logits(reloaded, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)
    assert done.achieved == 1.0


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("budget", [0.4, 0.7])
def test_pruned_model_is_smaller_dense_and_reloads(tmp_path, model, budget):
    done = compress_in_memory(*tiny_overrides(model), "method=id", f"budget={budget}")
    assert done.achieved <= budget
    reloaded = shrink.load(done.save(tmp_path / "model"))
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))
    # physically smaller: plain Linear layers of reduced width, no masks, no extra modules
    linears = [m for m in reloaded.modules() if isinstance(m, torch.nn.Linear)]
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    assert len(linears) == len([m for m in dense.modules() if isinstance(m, torch.nn.Linear)])
    params = sum(p.numel() for p in reloaded.parameters())
    assert (
        params == sum(p.numel() for p in done.model.parameters()) < sum(p.numel() for p in dense.parameters())
    )


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_gqa_keeps_equal_query_heads_per_kv_group(tmp_path, budget):
    overrides = [*tiny_overrides("tiny-llama"), "method=id", "method.attention=heads", "schedule=uniform"]
    done = compress_in_memory(*overrides, f"budget={budget}")
    model = shrink.load(done.save(tmp_path / "model"))
    adapter = build_adapter(model)
    for block in adapter.blocks():
        n_heads, n_kv = adapter.attention(block).counts()
        assert n_heads % n_kv == 0
        assert block.self_attn.num_key_value_groups == n_heads // n_kv
        assert block.self_attn.o_proj.in_features == n_heads * 16


def structured_problem(n=48, tokens=3000, latent=10, seed=0):
    """Columns that are noisy mixtures of a few latent factors with decaying scales."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(tokens, latent, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, latent)
    z = basis @ torch.randn(latent, n, generator=gen, dtype=torch.float64)
    return z + 1e-3 * torch.randn(tokens, n, generator=gen, dtype=torch.float64)


def test_a_consumed_column_major_gram_is_factored_in_place_with_the_same_pivots():
    z = torch.randn(300, 120, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = z.T @ z
    owned = column_major(gram.shape, gram)
    owned.copy_(gram)
    kept = pivoted_cholesky(gram.clone(), 80)
    consumed = pivoted_cholesky(owned, 80, consume=True)
    for a, b in zip(kept, consumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(owned, gram)  # LAPACK wrote its factor there: no 1 GB copy at 11008 wide
    untouched = gram.clone()
    pivoted_cholesky(untouched, 80)
    assert torch.equal(untouched, gram)  # without consume the caller's matrix is left as it was


def test_cholesky_and_sketched_qr_select_the_same_columns():
    z = structured_problem()
    gen = torch.Generator().manual_seed(1)
    sketch = torch.randn(2 * z.shape[1], z.shape[0], generator=gen, dtype=torch.float64) @ z
    chol = pivoted_cholesky(z.T @ z, 10).order
    assert chol.tolist() == pivoted_qr(z, 10).tolist()  # exact: QR of Z itself
    assert chol.tolist() == pivoted_qr(sketch, 10).tolist()  # the streamed-sketch check path


def test_head_selection_from_gram_equals_block_qr():
    """Block pivoted Cholesky of ZᵀZ selects exactly the heads of block pivoted QR of Z."""
    from shrink.methods.id.attention import sketch_heads

    always = lambda chosen: torch.ones(8, dtype=torch.bool)  # noqa: E731
    for seed in range(3):
        z = structured_problem(n=64, latent=40, seed=seed)
        by_gram = block_pivoted_cholesky(z.T @ z, 8, 5, always).order
        assert by_gram == sketch_heads(z, 8, 5, always)


def test_id_beats_random_subsets():
    z = structured_problem()
    gram = z.T @ z
    keep = pivoted_cholesky(gram, 10).order.sort().values
    error = (z - z[:, keep] @ interpolation_matrix(gram, keep)).norm()
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        rand = torch.randperm(z.shape[1], generator=gen)[:10].sort().values
        assert error < (z - z[:, rand] @ interpolation_matrix(gram, rand)).norm()


def test_singular_gram_is_regularised_not_propagated():
    z = structured_problem()
    z = torch.cat([z, z[:, :5]], dim=1)  # duplicated neurons: G[J,J] singular if both kept
    keep = torch.arange(z.shape[1])
    t = interpolation_matrix(z.T @ z, keep)
    assert torch.isfinite(t).all() and torch.equal(t, torch.eye(z.shape[1], dtype=t.dtype))


def test_sketch_qr_selection_runs_end_to_end():
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=id", "method.selection=sketch_qr", "budget=0.6"
    )
    assert done.achieved <= 0.6


def test_heads_only_below_reach_fails_clearly(tmp_path, monkeypatch):
    from shrink.errors import ShrinkError
    from shrink.run.pipeline import run

    monkeypatch.setattr("shrink.run.store.load_model", lambda *a, **k: pytest.fail("loaded"))
    overrides = [*tiny_overrides("tiny-llama"), "method=id", "schedule=uniform", "method.ffn=false"]
    cfg = make_cfg(*overrides, "budget=0.5")
    with pytest.raises(
        ShrinkError, match=r"budget 0.5 cannot .* 'uniform' .*: block 0 keeps at least 0\.[6-9]"
    ):
        run(cfg, run_dir=tmp_path / "run")


def test_interpolation_is_least_squares_without_ridge_and_bounded_with_it():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(200, 1, generator=gen, dtype=torch.float64)
    noise = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    # kept columns 0 and 1 are nearly collinear; dropped column 2 leans on their tiny difference
    z = torch.cat([base, base + 1e-4 * noise[:, :1], base + 0.1 * noise[:, 1:]], dim=1)
    keep = torch.tensor([0, 1])
    exact = interpolation_matrix(z.T @ z, keep, ridge=0.0)
    lstsq = torch.linalg.lstsq(z[:, keep], z).solution
    torch.testing.assert_close(exact, lstsq, rtol=1e-6, atol=1e-6)
    assert exact.abs().max() > 10  # the fit exploits the near-collinearity
    assert interpolation_matrix(z.T @ z, keep).abs().max() < 1.5  # the default ridge does not


def test_the_fold_solved_into_its_rows_by_slabs_is_the_ridge_solution():
    """The interpolation is solved into the kept rows a few columns at a time: it equals the
    ridge solution (G_JJ + λI)⁻¹ G_J: with T_J = I, and the retried ridge of a singular system
    leaves the system's diagonal as it found it."""
    from shrink.linalg.decompositions import _interpolation_from_rows, _ridged_cholesky

    z = structured_problem(n=30)
    gram, keep = z.T @ z, torch.tensor([0, 3, 4, 9, 17, 21, 22, 29])
    system = gram[keep][:, keep]
    lam = 1e-2 * float(torch.diagonal(system).mean())
    expected = torch.linalg.solve(system + lam * torch.eye(len(keep), dtype=gram.dtype), gram[keep])
    expected[:, keep] = torch.eye(len(keep), dtype=gram.dtype)
    by_slabs = _interpolation_from_rows(gram[keep], keep, 1e-2, chunk=4)
    torch.testing.assert_close(by_slabs, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(by_slabs, interpolation_matrix(gram, keep), rtol=1e-12, atol=1e-12)

    singular = torch.ones(4, 4, dtype=torch.float64)
    singular[0, 0] = -1.0  # not positive definite until the ridge is raised
    copy = singular.clone()
    plain = _ridged_cholesky(copy, 0.0, 1e-12, 10.0, "test")
    owned = _ridged_cholesky(singular, 0.0, 1e-12, 10.0, "test", owned=True)
    assert plain[1] == owned[1] > 0 and torch.equal(plain[0], owned[0])
    assert torch.equal(singular, copy)


def test_a_non_finite_gram_fails_the_selection_in_either_storage_order():
    from shrink.errors import NumericalError

    z = structured_problem(n=20)
    for order in ("row", "column"):
        gram = (z.T @ z).clone() if order == "row" else column_major(torch.Size([20, 20]), z).copy_(z.T @ z)
        gram[13, 2] = float("nan")
        with pytest.raises(NumericalError, match="non-finite Gram"):
            pivoted_cholesky(gram, 5)


@pytest.mark.parametrize("rank", [96, 40])
def test_block_selection_adds_a_head_at_once_as_column_by_column(monkeypatch, rank):
    """Adding a chosen head's columns in one triangular solve gives the column-by-column pivoted
    Cholesky's picks and residual energies (full rank), and falls back to it when a head is
    (nearly) in the span of what was chosen (rank 40 < 96 columns)."""
    from shrink.linalg import decompositions as linalg
    from shrink.methods.id.attention import group_constraint

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(500, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, 96, generator=gen, dtype=torch.float64
    )
    g = z.T @ z
    eligible = group_constraint(6, 2, 2, 2)
    fast = linalg.block_pivoted_cholesky(g, 16, 4, eligible)
    monkeypatch.setattr(linalg, "_block_columns", lambda *args: None)
    slow = linalg.block_pivoted_cholesky(g, 16, 4, eligible)
    live = int((slow.remaining[:-1] > 1e-9 * slow.remaining[0]).sum())
    assert list(fast.order)[:live] == list(slow.order)[:live] and live >= 2
    assert torch.allclose(fast.remaining, slow.remaining, rtol=1e-8, atol=1e-9 * float(slow.remaining[0]))
