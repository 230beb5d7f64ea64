"""Sparsity and quantization stacked on the methods: the solvers against direct
computations on explicit activations, the N:M and grid invariants, every method × step composing
on tiny models, and bad settings failing before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

import shrink
from shrink.blocks.steps import Moments, _parts
from shrink.linalg.decompositions import truncated_svd
from shrink.models import build_adapter, load_model
from shrink.models.edits import CorrectedLinear, HeadSlicedLinear, LowRankLinear
from shrink.quantization.gptq import asymmetric_target, gptq, gptq_refitted, refit_scales
from shrink.quantization.lowrank import lowrank_correction
from shrink.quantization.rtn import rtn
from shrink.sparsity.sparsegpt import sparsegpt
from shrink.sparsity.wanda import wanda

from ..conftest import FAST, compress_in_memory, fails, logits, make_cfg, tiny_overrides


def _problem(rows: int = 24, cols: int = 64, seed: int = 0):
    """Correlated inputs (as layer inputs are) and a weight; H = XᵀX."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1500, cols, generator=gen, dtype=torch.float64)
    x = x @ torch.randn(cols, cols, generator=gen, dtype=torch.float64) / cols**0.5
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return x, w, x.T @ x


def _error(x, w, q) -> float:
    """The layer-wise objective ‖XWᵀ − XQᵀ‖² relative to ‖XWᵀ‖², on the explicit activations."""
    return float(((x @ (w - q).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


@pytest.mark.parametrize("sym", [True, False])
def test_round_to_nearest_is_the_nearest_grid_point_of_each_group(sym):
    _, w, _ = _problem()
    q, grid = rtn(w, 4, 16, sym)
    for g in range(4):
        cols = slice(16 * g, 16 * (g + 1))
        block = w[:, cols]
        lo, hi = block.min(1).values.clamp_max(0), block.max(1).values.clamp_min(0)
        if sym:
            scale = torch.maximum(lo.abs(), hi) / 7.5
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / 15
            zero = (-8 - lo / scale).round().clamp(-8, 7)
        assert torch.allclose(grid.scale[:, g], scale) and torch.equal(grid.zero[:, g], zero)
        levels = (block / scale[:, None]).round() + zero[:, None]
        assert torch.allclose(q[:, cols], (levels.clamp(-8, 7) - zero[:, None]) * scale[:, None])


@pytest.mark.parametrize("sym", [True, False])
def test_a_clipped_grid_is_the_searched_range_with_the_least_rounding_error(sym):
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(24, 64, generator=gen, dtype=torch.float64).exp()
    w = spread * torch.randn(24, 64, generator=gen, dtype=torch.float64)  # heavy tails, as weights have
    q, grid = rtn(w, 4, 16, sym, clip=True)
    plain, wide = rtn(w, 4, 16, sym)
    per_group = lambda x: (x - w).abs().pow(2.4).reshape(24, 4, 16).sum(-1)  # noqa: E731
    assert (per_group(q) <= per_group(plain) + 1e-9).all()  # the search includes the full range
    clipped = grid.scale < wide.scale - 1e-12
    assert clipped.float().mean() > 0.2 and per_group(q).sum() < 0.95 * per_group(plain).sum()
    shrink = (grid.scale / wide.scale)[clipped]  # each a searched factor: 0.99, 0.98, …, 0.21
    if sym:  # (an asymmetric grid also rounds its zero point, so only the symmetric scale is exact)
        assert torch.allclose(shrink * 100, (shrink * 100).round(), atol=1e-6)
    assert (shrink > 0.2).all()
    gptq_clipped, _ = gptq(w, w.T @ w, 4, 16, sym, True, 0.01, clip=True)
    assert torch.isfinite(gptq_clipped).all()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_gptq_lowers_the_layer_error_of_round_to_nearest(bits, act_order, group_size):
    x, w, h = _problem()
    q, grid = gptq(w, h, bits, group_size, True, act_order, 0.01)
    assert _error(x, w, q) < 0.7 * _error(x, w, rtn(w, bits, group_size, True)[0])
    # every weight lies on its group's grid
    cols = grid.columns(w.shape[1])
    levels = q / grid.scale[:, cols] + grid.zero[:, cols]
    assert torch.allclose(levels, levels.round(), atol=1e-6)
    assert levels.min() >= grid.qmin - 1e-6 and levels.max() <= grid.qmax + 1e-6


@pytest.mark.parametrize("sym", [True, False])
def test_refitted_scales_keep_the_codes_and_are_the_least_squares_scales(sym):
    """The refit keeps every integer code and zero point, lowers the layer error of GPTQ's
    grid, and each row's scales are the least-squares solution on the explicit activations
    (no damping, to compare with lstsq)."""
    x, w, h = _problem()
    q, grid = gptq(w, h, 4, 16, sym, True, 0.01)
    fitted, refit = refit_scales(q, grid, w, h, 1e-12)
    cols = grid.columns(w.shape[1])
    codes = q / grid.scale[:, cols]
    assert torch.allclose(fitted / refit.scale[:, cols], codes, atol=1e-6)
    assert torch.equal(refit.zero, grid.zero) and (refit.scale > 0).all()
    assert _error(x, w, fitted) < 0.97 * _error(x, w, q)
    for row in (0, 7):  # min over s of ‖X(Σ_g s_g c_g − w)‖: columns X_g c_g of each group
        design = torch.stack([x[:, cols == g] @ codes[row, cols == g] for g in range(4)], 1)
        best = torch.linalg.lstsq(design, x @ w[row]).solution
        assert torch.allclose(refit.scale[row], best, rtol=1e-4)


def test_a_group_of_zero_codes_keeps_its_scale():
    x, w, h = _problem()
    w[:3, :16] = 0  # rows whose first group rounds to all zeros
    q, grid = gptq(w, h, 4, 16, True, False, 0.01)
    fitted, refit = refit_scales(q, grid, w, h, 0.01, torch.float32)
    assert torch.equal(refit.scale[:3, 0], grid.scale[:3, 0]) and torch.isfinite(fitted).all()
    assert torch.equal(refit.scale, refit.scale.float().double())  # stored exactly as the checkpoint will


def test_rounds_of_refitting_never_raise_the_layer_error():
    """Each round can only add a candidate: the layer error falls with the rounds, from GPTQ's own
    (0 rounds is GPTQ exactly), and GPTQ on a given grid keeps that grid."""
    x, w, h = _problem(rows=48)
    settings = {"bits": 4, "group_size": 16, "sym": True, "act_order": True}
    errors = []
    for rounds in (0, 1, 3):
        q, grid = gptq_refitted(w, h, w, rounds, 0.01, **settings)
        errors.append(_error(x, w, q))
    assert torch.equal(
        gptq_refitted(w, h, w, 0, 0.01, **settings)[0], gptq(w, h, dampening=0.01, **settings)[0]
    )
    assert errors[2] <= errors[1] < 0.98 * errors[0]
    again, same = gptq(w, h, dampening=0.01, fixed=grid, **settings)
    assert torch.equal(same.scale, grid.scale) and torch.equal(same.zero, grid.zero)


def test_gptq_at_eight_bits_keeps_the_outputs():
    x, w, h = _problem()
    q, _ = gptq(w, h, 8, -1, True)
    assert _error(x, w, q) < 1e-4


def test_gptq_quantizes_each_column_and_updates_the_rest_as_the_paper_says():
    """One column at a time with no lazy blocks (block=1) equals the lazy-block version."""
    _, w, h = _problem(rows=8, cols=24)
    lazy, _ = gptq(w, h, 4, 8, False, False, 0.01, block=128)
    eager, _ = gptq(w, h, 4, 8, False, False, 0.01, block=1)
    assert torch.allclose(lazy, eager, atol=1e-9)


@pytest.mark.parametrize("solver", ["wanda", "sparsegpt"])
def test_two_of_four_keeps_at_most_two_of_every_four_inputs(solver):
    x, w, h = _problem()
    pruned, keep = wanda(w, h, 0.5, (2, 4)) if solver == "wanda" else sparsegpt(w, h, 0.5, (2, 4))
    assert (keep.view(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert torch.equal(pruned != 0, keep & (pruned != 0)) and (pruned[~keep] == 0).all()
    # the quantized pruned weight keeps the mask
    q, _ = gptq(pruned, h, 4, 16, True, keep=keep)
    assert (q[~keep] == 0).all()


def test_wanda_keeps_the_largest_scores_and_sparsegpt_updates_what_it_keeps():
    x, w, h = _problem()
    _, keep = wanda(w, h, 0.5, None)
    score = w.abs() * torch.diagonal(h).sqrt()
    for row in range(w.shape[0]):
        assert score[row][keep[row]].min() >= score[row][~keep[row]].max()
    assert (keep.sum(1) == 32).all()
    sparse, keep_s = sparsegpt(w, h, 0.5, None)
    assert abs(float(keep_s.double().mean()) - 0.5) < 0.02
    assert _error(x, w, sparse) < 0.8 * _error(x, w, w * keep_s)  # the OBS update pays off


def test_a_factor_pair_and_a_thin_output_projection_get_their_own_input_moments():
    x, _, h = _problem(cols=16)
    reference = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    moments = Moments(h, reference.T @ x, reference.T @ reference)
    pair = LowRankLinear(16, 12, 5, bias=False).double()
    parts = _parts(pair, moments)
    hidden, hidden_ref = pair.first(x).detach(), pair.first(reference).detach()
    assert torch.allclose(parts[1][2].gram, hidden.T @ hidden)
    assert torch.allclose(parts[1][2].cross, hidden_ref.T @ hidden)
    assert torch.allclose(parts[1][2].reference, hidden_ref.T @ hidden_ref)
    sliced = HeadSlicedLinear(heads=4, width=3, head_dim=4, out_features=8)
    ((_, _, m),) = _parts(sliced, moments)
    cols = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14])
    assert torch.allclose(m.gram, x[:, cols].T @ x[:, cols])
    assert torch.allclose(m.cross, reference[:, cols].T @ x[:, cols])


METHODS = [
    ["method=id", "budget=0.8"],
    ["method=svd", "budget=0.8"],
    ["method=rom", "budget=0.8"],
    ["method=svdllm", "budget=0.8"],
    ["method=distill", "method.steps=2", "budget=0.8"],
    ["method=flap", "budget=0.8"],
    ["method=shortgpt", "budget=0.8"],
    ["method=llm-pruner", "schedule=uniform", "budget=0.8"],
    ["method=slicegpt", "budget=0.8"],
]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m[0])
def test_every_method_composes_with_two_of_four_and_four_bits(tmp_path, model, method):
    if method[0] == "method=llm-pruner" and model == "tiny-bert":
        pytest.skip("llm-pruner scores by the next-token loss, which encoders lack")
    if method[0] == "method=slicegpt" and model == "tiny-bert":
        pytest.skip("slicegpt rotates pre-norm streams; BERT is post-norm")
    group = 32 if method[0] in ("method=id", "method=flap") else -1  # tiny ranks are below one group of 32
    done = compress_in_memory(
        *tiny_overrides(model), *method, "sparsity=sparsegpt", "sparsity.pattern=2:4", "quant=gptq",
        f"quant.group_size={group}",
    )  # fmt: skip
    assert done.achieved <= 0.8
    assert done.steps and all(r["step"] == "sparsegpt+gptq" for r in done.steps)
    adapter = build_adapter(done.model)
    for block in adapter.blocks():
        for site in adapter.sites(block):
            for path in site.linears:
                for _, linear, _ in _parts(block.get_submodule(path), None):
                    spans = linear.weight.detach().view(linear.out_features, -1, 4)
                    assert ((spans != 0).sum(-1) <= 2).all(), path
    reloaded = shrink.load(done.save(tmp_path / "model"))
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))


def test_eight_bit_gptq_keeps_the_logits_of_the_model():
    dense = load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=0).model
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=id", "budget=1.0", "schedule=uniform", "quant=gptq",
        "quant.bits=8", "quant.group_size=32",
    )  # fmt: skip
    ids = torch.randint(0, 255, (2, 32))
    ours, theirs = logits(done.model, ids), logits(dense, ids)
    assert (ours - theirs).abs().max() < 2e-2 * theirs.abs().max()
    assert max(r["rel_error"] for r in done.steps) < 1e-2


def test_a_run_reports_bits_per_weight_and_zeros(run_job, capsys):
    from ..conftest import FAST

    metrics, folder = run_job(
        "model=tiny-llama", *FAST, "eval=none", "method=id", "budget=0.8", "quant=rtn", "quant.bits=4",
        "quant.group_size=32", "sparsity=wanda", "sparsity.fraction=0.25",
    )  # fmt: skip
    # 4 bits and a scale in the model's dtype (float32) per 32 weights: widths keep whole groups
    assert metrics["block_bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert metrics["block_zero_fraction"] >= 0.25
    assert metrics["quant"]["name"] == "rtn" and metrics["sparsity"]["name"] == "wanda"
    assert (folder / "steps.jsonl").read_text().count("\n") == 14  # 7 linears × 2 blocks
    assert "steps      sparsity=wanda quant=rtn: block linears at 5.00 bits/weight" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["quant=gptq", "quant.bits=5"], r"quant.bits=5 is not supported; valid: 8, 4, 3, 2"),
        (
            ["quant=rtn", "quant.group_size=48"],
            r"quant.group_size=48 is not supported; valid: -1, 32, 64, 128",
        ),
        (["quant=gptq", "quant.dampening=0"], r"quant.dampening=0.0 must be positive"),
        (
            ["quant=gptq", "quant.alpha=2"],
            r"quant.alpha=2.0 scales GPTAQ's asymmetry term: a value in \(0, 1\]$",
        ),
        (
            ["quant=rtn", "quant.refit=1"],
            r"quant.refit fits scales to the calibration inputs; quant=rtn has no calibration: use",
        ),
        (["quant=gptq", "quant.refit=-1"], r"quant.refit=-1 is a number of rounds: 0 \(none\) or more$"),
        (["sparsity=wanda", "sparsity.pattern=4:2"], r"sparsity.pattern='4:2' is not a pattern"),
        (["sparsity=wanda", "sparsity.pattern=half"], r"sparsity.pattern='half' is not a pattern"),
        (["sparsity=sparsegpt", "sparsity.fraction=1.5"], r"sparsity.fraction=1.5 must be in \(0, 1\)"),
        (["sparsity=sparsegpt", "sparsity.pattern=3:7"], r"needs input widths divisible by 7, but block 0"),
    ],
)
def test_bad_step_settings_fail_before_loading(tmp_path, overrides, match):
    fails(tmp_path, "model=tiny-llama", "logger=none", "device=cpu", *overrides, match=match)


def test_gptaq_fits_the_reference_outputs_better_than_gptq():
    """Inputs that drifted from the reference (X̃ = X·(I + D), as an earlier compressed layer
    distorts them): GPTAQ's recursion lowers ‖X̃Qᵀ − XWᵀ‖ against GPTQ of W, more with the whole
    asymmetry term (α = 1) than with the authors' α = 0.25; with no drift it is GPTQ exactly, and
    its lazy blocks change nothing."""
    x, w, _ = _problem()
    distortion = 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    drifted = x @ (torch.eye(64, dtype=x.dtype) + distortion)
    gram, cross = drifted.T @ drifted, x.T @ drifted

    def asymmetric(q):
        return float(((drifted @ q.T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())

    plain, _ = gptq(w, gram, 4, 16, True, True, 0.01)
    quarter, _ = gptq(w, gram, 4, 16, True, True, 0.01, asymmetry=cross - gram, alpha=0.25)
    whole, _ = gptq(w, gram, 4, 16, True, True, 0.01, asymmetry=cross - gram, alpha=1.0)
    assert asymmetric(whole) < 0.6 * asymmetric(plain) and asymmetric(whole) < asymmetric(quarter)
    assert asymmetric(quarter) < 0.8 * asymmetric(plain)
    blocks, _ = gptq(w, gram, 4, 16, True, False, 0.01, block=8, asymmetry=cross - gram, alpha=1.0)
    one_block, _ = gptq(w, gram, 4, 16, True, False, 0.01, block=64, asymmetry=cross - gram, alpha=1.0)
    assert torch.allclose(blocks, one_block, atol=1e-12)
    undrifted, _ = gptq(w, gram, 4, 16, True, True, 0.01, asymmetry=torch.zeros_like(gram))
    assert torch.equal(undrifted, plain)


def test_the_asymmetric_target_is_the_least_squares_fit_at_alpha_one():
    x, w, h = _problem()
    drifted = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    gram, cross = drifted.T @ drifted, x.T @ drifted
    least_squares = torch.linalg.lstsq(drifted, x @ w.T).solution.T
    assert torch.allclose(asymmetric_target(w, gram, cross, 1e-12), least_squares, atol=1e-6)
    half = asymmetric_target(w, gram, cross, 1e-12, alpha=0.5)
    assert torch.allclose(half, (w + least_squares) / 2, atol=1e-6)
    assert torch.allclose(asymmetric_target(w, h, h, 0.01), w, atol=1e-12)  # no drift: W, damped or not


@pytest.mark.parametrize("form", ["recursion", "target"])
@pytest.mark.parametrize("method", METHODS[:2], ids=lambda m: m[0])
def test_gptaq_runs_on_the_dense_stream_and_reloads(tmp_path, method, form):
    """Both forms, and with scales refitted (to the closed-form target either way)."""
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), *method, "quant=gptq", "quant.group_size=-1", "quant.target=dense",
        f"quant.gptaq_form={form}", f"quant.refit={2 if form == 'recursion' else 0}",
    )  # fmt: skip
    assert done.steps and all(0 < r["rel_error"] < 1 for r in done.steps)
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(done.model, ids))


def test_gptaq_with_round_to_nearest_fails_before_loading(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "eval=none", "quant=rtn", "quant.target=dense",
        match=r"quant.target=dense calibrates GPTQ \(GPTAQ\); quant=rtn has no calibration: use quant=gptq$",
    )  # fmt: skip


def test_the_low_rank_correction_is_the_best_rank_r_fit_of_the_error_on_the_inputs():
    x, w, h = _problem()
    q, _ = rtn(w, 3, 16, True)
    error = w - q

    def left_over(lr):
        return float(((x @ (error - lr).T) ** 2).sum() / ((x @ error.T) ** 2).sum())

    fits = {r: left_over(torch.matmul(*lowrank_correction(error, h, r))) for r in (2, 4, 8)}
    assert fits[2] > fits[4] > fits[8]
    left, right, _ = truncated_svd(error, 4)  # the unweighted SVD of the error fits the outputs worse
    assert fits[4] < left_over(left @ right)
    assert left_over(torch.matmul(*lowrank_correction(error, h, 24))) < 1e-8  # full rank: all of it


def test_a_corrected_quantization_lowers_every_error_reloads_and_counts_in_the_budget(tmp_path):
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=id", "budget=0.8", "quant=gptq", "quant.bits=3",
        "quant.group_size=32", "quant.lowrank=4",
    )  # fmt: skip
    assert all(r["rel_error"] < r["rel_error_uncorrected"] for r in done.steps)
    corrected = [m for m in done.model.modules() if isinstance(m, CorrectedLinear)]
    assert len(corrected) == 14 and all(m.rank == 4 for m in corrected)
    assert done.achieved <= 0.8  # the corrections' 4·(m+n) weights included
    folder = done.save(tmp_path / "model")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sum(e["kind"] == "corrected" for e in manifest["edits"]) == 14
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(shrink.load(folder), ids), logits(done.model, ids))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["quant.lowrank=4"], r"quant.lowrank=4: quant=none runs no quantization.*quant=gptq or quant=rtn"),
        (
            ["method=svd", "quant=gptq", "quant.lowrank=4"],
            r"quant.lowrank corrects plain linears; method=svd leaves rank-r factor pairs",
        ),
        (["quant=gptq", "quant.lowrank=-1"], r"quant.lowrank=-1 must be a rank: 0 \(no correction\)"),
        (
            ["quant=gptq", "quant.group_size=32", "quant.lowrank=30", "budget=0.5"],
            r"quant.lowrank=30: the corrections alone cost 0\.\d+ of the blocks, above budget 0.5",
        ),
    ],
)
def test_bad_corrections_fail_before_compressing(tmp_path, overrides, match):
    fails(tmp_path, "model=tiny-llama", *FAST, "eval=none", *overrides, match=match)
