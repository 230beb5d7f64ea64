"""The fold's ridge chosen by cross-validation over calibration windows, from moments alone."""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.linalg.decompositions import fold
from shrink.linalg.moments import SecondMoment
from shrink.linalg.ridge import RIDGE_GRID, cross_validated_ridge, held_aside_pieces, ridge_from_pieces
from shrink.models import load_model

from ..conftest import compress_in_memory, fails, logits, make_cfg, tiny_overrides


def _explicit_errors(z_parts, keep, drop, w, grid):
    """The same held-aside errors computed from the activations themselves."""
    errors = []
    for r in grid:
        total, energy = 0.0, 0.0
        for i, held in enumerate(z_parts):
            fit = torch.cat([z for j, z in enumerate(z_parts) if j != i])
            a = fit[:, keep].T @ fit[:, keep]
            lam = r * float(torch.diagonal(a).mean())
            t = torch.linalg.solve(
                a + lam * torch.eye(len(keep), dtype=a.dtype), fit[:, keep].T @ fit[:, drop]
            )
            residual = (held[:, drop] - held[:, keep] @ t) @ w[:, drop].T
            total += float((residual**2).sum())
            energy += float(((held[:, drop] @ w[:, drop].T) ** 2).sum())
        errors.append(total / energy)
    return errors


def test_closed_form_equals_explicit_cross_validation():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    z_parts = [torch.randn(40, 12, generator=gen, dtype=torch.float64) @ mix for _ in range(3)]
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 9, 10])
    drop = torch.tensor([1, 4, 5, 6, 8, 11])
    choice = cross_validated_ridge([z.T @ z for z in z_parts], keep, w)
    expected = _explicit_errors(z_parts, keep, drop, w, RIDGE_GRID)
    assert torch.allclose(torch.tensor(choice.errors), torch.tensor(expected), rtol=1e-8)
    assert choice.ridge == RIDGE_GRID[min(range(len(expected)), key=expected.__getitem__)]
    # read and scored a few rows at a time (as a wide FFN is): the same errors
    grams = [z.T @ z for z in z_parts]
    pieces = held_aside_pieces(lambda g, index: grams[g][index], 3, keep, w, chunk=4)
    by_slabs = ridge_from_pieces(pieces, chunk=4)
    assert torch.allclose(torch.tensor(by_slabs.errors), torch.tensor(expected), rtol=1e-8)


def test_noisy_columns_get_a_larger_ridge_than_clean_ones():
    """Dropped columns that are an exact combination of the kept ones need no shrinkage; ones
    that are mostly noise, fitted on few tokens, want a strong ridge."""
    gen = torch.Generator().manual_seed(1)
    kept = torch.randn(4, 30, 8, generator=gen, dtype=torch.float64)
    exact = kept @ torch.randn(8, 4, generator=gen, dtype=torch.float64)
    noisy = 0.05 * exact + torch.randn(4, 30, 4, generator=gen, dtype=torch.float64)
    w = torch.ones(3, 12, dtype=torch.float64)
    keep = torch.arange(8)
    clean = cross_validated_ridge([z.T @ z for z in torch.cat([kept, exact], -1)], keep, w)
    loud = cross_validated_ridge([z.T @ z for z in torch.cat([kept, noisy], -1)], keep, w)
    assert clean.ridge == RIDGE_GRID[0] and loud.ridge > 1e-2


def test_second_moment_parts_sum_to_the_whole_and_follow_windows():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, 6, generator=gen)
    parted = SecondMoment(6, parts=2, batch_dtype=torch.float64)
    plain = SecondMoment(6, batch_dtype=torch.float64)
    for batch in (x[:3], x[3:]):
        parted.update(batch)
        plain.update(batch)
    everything = torch.arange(6)
    groups = [parted.part_rows(g, everything) for g in range(2)]
    assert len(parted.parts) == 1  # the last group's Gram is derived, not stored
    assert torch.allclose(groups[0] + groups[1], plain.xtx, rtol=1e-12)
    assert torch.allclose(parted.xtx, plain.xtx, rtol=1e-12)
    even, odd = x[0::2].reshape(-1, 6).double(), x[1::2].reshape(-1, 6).double()
    assert torch.allclose(groups[0], even.T @ even, rtol=1e-12)  # windows 0, 2, 4
    assert torch.allclose(groups[1], odd.T @ odd, rtol=1e-12)  # windows 1, 3
    assert torch.equal(parted.part_rows(1, torch.tensor([4, 1])), groups[1][[4, 1]])


def test_set_aside_frees_the_gram_and_restores_it_bit_for_bit(tmp_path, monkeypatch):
    """A wide site's XᵀX leaves memory while a step needs it and comes back unchanged; the
    groups' Grams stay in the file and read back the same rows; nothing is left behind."""
    import gc

    import shrink.linalg.moments as moments

    monkeypatch.setattr(moments, "_SET_ASIDE_ENTRIES", 0)  # every size is set aside here
    stats = SecondMoment(6, parts=3, batch_dtype=torch.float64)
    stats.update(torch.randn(6, 5, 6, generator=torch.Generator().manual_seed(4)))
    xtx = stats.xtx.clone()
    index = torch.tensor([5, 0, 3])
    rows = [stats.part_rows(g, index) for g in range(3)]
    left = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with stats.set_aside(tmp_path / "scratch"):
        assert stats.xtx is None and stats.parts == []
        assert len(list((tmp_path / "scratch").iterdir())) == 2  # XᵀX and the stored parts
        with stats.set_aside(tmp_path / "scratch"):  # nested: already aside, nothing moves
            assert len(list((tmp_path / "scratch").iterdir())) == 2
        # what the id step reads meanwhile: rows, a copy in LAPACK's layout, a quadratic form
        assert torch.equal(stats.rows(index), xtx[index])
        assert all(torch.equal(stats.part_rows(g, index), r) for g, r in enumerate(rows))
        column_major = torch.empty_strided((6, 6), (1, 6), dtype=torch.float64)
        assert torch.equal(stats.xtx_into(column_major), xtx)
        expected = torch.einsum("ij,jk,ik->", left, xtx, left)
        assert torch.allclose(stats.quadratic_form(left), expected, rtol=1e-12)
    assert torch.equal(stats.xtx, xtx)
    assert all(torch.equal(stats.part_rows(g, index), r) for g, r in enumerate(rows))
    with stats.set_aside(None):  # no folder: nothing moves
        assert torch.equal(stats.xtx, xtx)
    assert len(list((tmp_path / "scratch").iterdir())) == 1  # the parts' file, while stats live
    del stats
    gc.collect()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_the_obs_update_of_what_is_kept_is_the_fold():
    """ZipLM's second-order update for removing input columns R of W (δW = −W_R ((H⁻¹)_RR)⁻¹ (H⁻¹)_R:,
    H = XᵀX) leaves on the kept columns exactly the least-squares refit, i.e. STAT's fold at
    ridge 0; removing nothing changes nothing."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 10, generator=gen, dtype=torch.float64) @ torch.randn(
        10, 10, generator=gen, dtype=torch.float64
    )
    w = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    stats = SecondMoment(10, batch_dtype=torch.float64)
    stats.update(x)
    keep, removed = torch.tensor([0, 1, 4, 6, 7, 9]), torch.tensor([2, 3, 5, 8])
    h_inv = torch.linalg.inv(stats.xtx)
    obs = w - w[:, removed] @ torch.linalg.solve(h_inv[removed][:, removed], h_inv[removed])
    assert torch.allclose(obs[:, removed], torch.zeros(4, 4, dtype=torch.float64), atol=1e-9)
    folded = w @ fold(stats, keep, ridge=0.0, affine=False).t.T
    assert torch.allclose(obs[:, keep], folded, atol=1e-8)
    least_squares = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    assert torch.allclose(folded, least_squares, atol=1e-8)
    everything = torch.arange(10)
    assert torch.allclose(w @ fold(stats, everything, ridge=0.0, affine=False).t.T, w, atol=1e-12)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt"])
def test_cross_validated_ridge_keeps_everything_exact_and_meets_the_budget(tmp_path, model):
    whole = compress_in_memory(*tiny_overrides(model), "method=id", "budget=1.0", "method.ridge_cv=4")
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(whole.model, ids), logits(dense, ids))
    done = compress_in_memory(*tiny_overrides(model), "method=id", "budget=0.6", "method.ridge_cv=4")
    assert done.achieved <= 0.6
    ridges = [r["ridge"] for r in done.rows if r.get("ridge") is not None]
    assert ridges and set(ridges) <= set(RIDGE_GRID)
    reloaded = shrink.load(done.save(tmp_path / "model"))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))


@pytest.mark.parametrize("count", ["1", "-2"])
def test_cross_validation_needs_two_groups(tmp_path, count):
    fails(
        tmp_path, *tiny_overrides("tiny-llama"), "method=id", "budget=0.6", f"method.ridge_cv={count}",
        match=rf"method.ridge_cv={count} must be 0",
    )  # fmt: skip


def test_cross_validation_needs_a_window_per_group(tmp_path):
    fails(
        tmp_path, *tiny_overrides("tiny-llama"), "method=id", "calib.nsamples=4", "method.ridge_cv=8",
        match=r"method.ridge_cv=8 deals the calibration windows into 8 groups.*calib.nsamples=4",
    )  # fmt: skip


@pytest.mark.parametrize("switch", ["method.bias=true", "method.target=dense"])
def test_the_affine_and_dense_target_folds_take_the_cross_validated_ridge(switch):
    """They fit other targets, but the ridge the plain fold's held-out error chose is theirs too:
    every folded unit records a grid value, not the fixed `method.ridge`."""
    done = compress_in_memory(
        *tiny_overrides("tiny-opt"), "method=id", "budget=0.6", "method.ridge_cv=2", switch
    )
    ridges = [r["ridge"] for r in done.rows if r.get("ridge") is not None]
    assert ridges and set(ridges) <= set(RIDGE_GRID) and done.achieved <= 0.6
