"""`schedule=greedy`: error profiles, global allocation, and per-layer sizes that reload."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import shrink
from shrink.config import BudgetUnit, ErrorCurrency
from shrink.errors import ShrinkError
from shrink.linalg.decompositions import pivoted_cholesky
from shrink.models import build_adapter, load_model
from shrink.planning.budget import Curve, Option, PlanInputs
from shrink.planning.cost import CostTable
from shrink.planning.schedules import greedy

from ..conftest import compress_in_memory, logits, make_cfg, tiny_overrides

ID_MODELS = ["tiny-llama", "tiny-opt", "tiny-bert", "tiny-qwen2", "tiny-distilbert"]


def test_residual_energy_is_the_exact_id_error():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(300, 12, generator=gen, dtype=torch.float64) @ torch.randn(
        12, 20, generator=gen, dtype=torch.float64
    )
    pivots = pivoted_cholesky(z.T @ z, 20)
    for k in (1, 5, 11):
        keep = pivots.order[:k]
        q, _ = torch.linalg.qr(z[:, keep])
        exact = (z - q @ (q.T @ z)).norm() ** 2
        assert float(pivots.remaining[k]) == pytest.approx(float(exact), rel=1e-8)
    assert float(pivots.remaining[0]) == pytest.approx(float((z**2).sum()))


def _curves(errors_by_unit: list[list[float]], unit_cost: float) -> list[Curve]:
    curves = []
    for b, errs in enumerate(errors_by_unit):
        options = [Option(unit_cost * (k + 1), e, {"neurons": k + 1}) for k, e in enumerate(errs)]
        curves.append(Curve(b, "mlp", ("mlp",), unit_cost * len(errs), options))
    return curves


def _allocate(curves, budget, monkeypatch, min_keep=0.0):
    table = CostTable(BudgetUnit.params, [{"mlp": c.dense_cost} for c in curves], [0.0] * len(curves))
    return greedy(PlanInputs(table, budget, curves=curves, min_keep=min_keep))


def test_greedy_meets_budget_and_is_optimal_on_small_problems(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    for trial in range(5):
        units = []
        for _ in range(4):  # four blocks of six neurons, convex error curves of different scales
            drops = (
                torch.rand(6, generator=gen).sort(descending=True).values
                * (trial + 1)
                * torch.rand(1, generator=gen)
            )
            units.append([float(drops[k + 1 :].sum()) for k in range(6)])
        curves = _curves(units, 10.0)
        plan = _allocate(curves, 0.5, monkeypatch)
        kept = [plan.choices[b]["mlp"]["neurons"] for b in range(4)]
        assert sum(kept) * 10 <= 0.5 * 240

        def loss(ks, units=units):  # greedy minimises the summed squared relative errors
            return sum(units[b][k - 1] ** 2 for b, k in enumerate(ks))

        best = min(loss(ks) for ks in itertools.product(range(1, 7), repeat=4) if sum(ks) * 10 <= 120)
        assert loss(kept) == pytest.approx(best, abs=1e-9)


def test_the_residual_currency_weighs_units_by_their_share_of_the_residual_stream():
    """Same relative error curves; the unit whose output is the larger share of its residual stream
    keeps more under error=residual, and the two are treated alike under error=unit."""
    errs = [1.0 - k / 8 for k in range(1, 9)]
    curves = _curves([errs, errs], 1.0)
    curves[0].energy, curves[1].energy = 0.5, 0.01
    curves[0].residual = curves[1].residual = (1.0, 1.0)
    table = CostTable(BudgetUnit.params, [{"mlp": c.dense_cost} for c in curves], [0.0] * 2)
    by_unit = greedy(PlanInputs(table, 0.5, curves=curves))
    by_residual = greedy(PlanInputs(table, 0.5, curves=curves, error=ErrorCurrency.residual))
    kept = [[p.choices[b]["mlp"]["neurons"] for b in (0, 1)] for p in (by_unit, by_residual)]
    assert abs(kept[0][0] - kept[0][1]) <= 1 and sum(kept[0]) <= 8
    assert kept[1][0] >= 6 and kept[1][1] <= 2 and sum(kept[1]) <= 8


def test_id_curves_carry_the_weighted_output_energy_and_the_residual_stream():
    """Curve.energy / Curve.residual[0] of id's FFN: Σⱼ‖W_down[:, j]‖² E[zⱼ²] over the median
    token's ‖h‖², computed here on explicit activations captured from the tiny block."""
    from shrink.blocks.placement import OnDevice
    from shrink.blocks.runner import Runner
    from shrink.config import Propagate
    from shrink.methods import build_method

    cfg = make_cfg(*tiny_overrides("tiny-llama"), "method=id")
    loaded = load_model(cfg.model, torch.float32, seed=0)
    method, cpu = build_method(cfg.method), torch.device("cpu")
    runner = Runner(loaded.adapter, torch.randint(0, 255, (4, 16)), 2, cpu, OnDevice(cpu))
    ctx = next(runner.blocks(Propagate.dense))
    mlp = next(c for c in method.profile(ctx) if c.name == "mlp")
    down = ctx.block.get_submodule(ctx.site("mlp_out").linears[0])
    seen = []
    handle = down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten(0, -2)))
    ctx.run_all(ctx.hidden)
    handle.remove()
    z = torch.cat(seen).to(torch.float64)
    h = torch.cat([x.reshape(-1, x.shape[-1]) for x in ctx.hidden]).to(torch.float64)
    w = down.weight.detach().to(torch.float64)
    expected = float(((z**2).mean(0) * (w**2).sum(0)).sum() / (h**2).sum(1).median())
    assert mlp.energy / mlp.residual[0] == pytest.approx(expected, rel=1e-6)
    out = torch.cat([x.flatten(0, -2) for x in ctx.outputs]).to(torch.float64)
    assert mlp.residual[1] == pytest.approx(float((out**2).sum(1).median()), rel=1e-9)


def test_the_downstream_currency_counts_an_error_at_every_later_block():
    """Three blocks whose residual streams leave with ‖h‖² 1, 2, 4: an error added by block b
    counts relative to every stream from b's output on, so blocks weigh 1.75, 0.75, 0.25."""
    from shrink.planning.schedules import _error_weights

    curves = _curves([[0.5, 0.0]] * 3, 1.0)
    for c, out in zip(curves, (1.0, 2.0, 4.0), strict=True):
        c.energy, c.residual = 2.0, (1.0, out)
    weights = _error_weights(curves, ErrorCurrency.downstream)
    assert weights == pytest.approx([2 * 1.75, 2 * 0.75, 2 * 0.25])
    assert _error_weights(curves, ErrorCurrency.residual) == pytest.approx([2.0] * 3)


@pytest.mark.parametrize("error", ["residual", "downstream"])
def test_the_residual_currencies_refuse_units_outside_the_residual_stream(error):
    """Before any work (validate), and in the schedule itself should profiles lack the energies."""
    from shrink.run.pipeline import validate

    overrides = ["model=tiny-llama", "method=svdllm", "schedule=greedy", f"schedule.error={error}"]
    refused = rf"schedule.error={error} compares units .* \(methods that do: id\); use schedule.error=unit"
    with pytest.raises(ShrinkError, match=refused):
        validate(make_cfg(*overrides))
    with pytest.raises(ShrinkError, match=f"schedule.error={error} needs units whose outputs"):
        compress_in_memory(*overrides)


def test_greedy_gives_more_to_units_with_larger_errors(monkeypatch):
    flat = [1.0 - k / 8 for k in range(1, 9)]  # every neuron matters
    easy = [0.01 * (1.0 - k / 8) for k in range(1, 9)]  # almost redundant
    plan = _allocate(_curves([flat, easy], 1.0), 0.5, monkeypatch)
    assert plan.choices[0]["mlp"]["neurons"] > plan.choices[1]["mlp"]["neurons"]


def test_min_keep_floors_every_unit(monkeypatch):
    flat = [1.0 - k / 10 for k in range(1, 11)]
    redundant = [0.0] * 10  # one neuron reproduces the unit exactly: unfloored greedy keeps 1
    curves = _curves([flat, redundant], 1.0)
    assert _allocate(curves, 0.5, monkeypatch).choices[1]["mlp"]["neurons"] == 1
    plan = _allocate(curves, 0.5, monkeypatch, min_keep=0.3)
    assert plan.choices[1]["mlp"]["neurons"] == 3
    assert plan.choices[0]["mlp"]["neurons"] == 7


def test_greedy_below_the_smallest_option_fails_clearly(monkeypatch):
    with pytest.raises(ShrinkError, match="budget 0.05 cannot be met by schedule 'greedy'"):
        _allocate(_curves([[0.5, 0.0], [0.5, 0.0]], 1.0), 0.05, monkeypatch)


@pytest.mark.parametrize("model", ID_MODELS)
def test_greedy_id_meets_budget_follows_plan_and_reloads(tmp_path, model):
    done = compress_in_memory(*tiny_overrides(model), "method=id", "schedule=greedy", "budget=0.6")
    assert 0.55 < done.achieved <= 0.6
    chosen = {(r["block"], "mlp"): r["neurons"] for r in done.plan.rows() if r["site"] == "mlp_out"}
    chosen |= {(r["block"], "attn"): r["heads"] for r in done.plan.rows() if r["site"] == "attn_out"}
    assert {(r["block"], r["site"]): r["kept"] for r in done.rows} == chosen
    ids = torch.randint(0, 255, (2, 48))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(done.model, ids))


def test_a_greedy_run_writes_its_plan_and_follows_it(run_job, saved_logits):
    """The end-to-end path: plan.jsonl, layers.jsonl and kept.png agree with the checkpoint."""
    model = "tiny-llama"
    metrics, folder = run_job(*tiny_overrides(model), "method=id", "schedule=greedy", "budget=0.6")
    assert metrics["budget_achieved"] <= 0.6
    assert metrics["budget_achieved"] > 0.55
    plan = [json.loads(line) for line in (folder / "plan.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (folder / "layers.jsonl").read_text().splitlines()]
    chosen = {(r["block"], "mlp"): r["neurons"] for r in plan if r["site"] == "mlp_out"}
    chosen |= {(r["block"], "attn"): r["heads"] for r in plan if r["site"] == "attn_out"}
    assert {(r["block"], r["site"]): r["kept"] for r in rows} == chosen
    assert (folder / "kept.png").read_bytes()[:4] == b"\x89PNG"
    reloaded = shrink.load(folder / "model")
    assert torch.equal(logits(reloaded, saved_logits["ids"]), saved_logits["logits"])


def test_greedy_sizes_differ_per_layer_and_reload(tmp_path):
    """Blocks with different spectra get different widths, and those per-layer widths reload."""
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=id", "schedule=greedy", "budget=0.5")
    model = shrink.load(done.save(tmp_path / "model"))
    adapter = build_adapter(model)
    widths = [block.mlp.down_proj.in_features for block in adapter.blocks()]
    assert len(set(widths)) > 1
    for block in adapter.blocks():
        n_heads, n_kv = adapter.attention(block).counts()
        assert n_heads % n_kv == 0 and block.self_attn.num_key_value_groups == n_heads // n_kv


def test_greedy_needs_a_method_with_profiles(tmp_path, monkeypatch):
    from shrink.methods.svd import SVD
    from shrink.run.pipeline import run

    monkeypatch.setattr(SVD, "has_profile", False)  # as a method without `profile` would be
    cfg = make_cfg(*tiny_overrides("tiny-llama"), "method=svd", "schedule=greedy")
    with pytest.raises(
        ShrinkError, match="method 'svd' does not provide; methods that do: distill, flap, id, llm-pruner, "
    ):
        run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["schedule.min_keep=0.6", "schedule.min_keep=-0.1"])
def test_greedy_floor_above_budget_fails_before_work(tmp_path, override):
    from shrink.run.pipeline import run

    cfg = make_cfg(*tiny_overrides("tiny-llama"), "method=id", "schedule=greedy", "budget=0.5", override)
    with pytest.raises(ShrinkError, match=r"schedule.min_keep=-?0.\d must lie in \[0, budget=0.5\]"):
        run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _block_linear_weights(model: str) -> int:
    dense = load_model(make_cfg(*tiny_overrides(model)).model, torch.float32).model
    return sum(
        m.weight.numel()
        for n, m in dense.named_modules()
        if n.startswith("model.layers") and isinstance(m, torch.nn.Linear)
    )


def test_attention_score_macs_count_and_shrink_with_heads():
    macs = ["budget_unit=macs", "budget_seq_len=128", "budget=0.5"]
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), "method=id", "method.attention=heads", "schedule=greedy", *macs
    )
    # 2 layers × 4 heads × head_dim 16 × (128 + 1) keys·MACs on top of the linears
    assert done.dense.macs == _block_linear_weights("tiny-llama") + 2 * 4 * 16 * 129
    assert done.achieved <= 0.5


def test_a_run_reports_macs_with_attention_scores(run_job):
    metrics, _ = run_job(
        *tiny_overrides("tiny-llama"),
        "method=id",
        "method.attention=heads",
        "budget_unit=macs",
        "budget_seq_len=128",
        "budget=0.5",
    )
    assert metrics["block_macs_dense"] == _block_linear_weights("tiny-llama") + 2 * 4 * 16 * 129
    assert metrics["budget_achieved"] <= 0.5 and metrics["budget_seq_len"] == 128
    assert metrics["block_macs_compressed"] / metrics["block_macs_dense"] == pytest.approx(
        metrics["budget_achieved"]
    )


@pytest.mark.parametrize("schedule", ["greedy", "energy"])
def test_budget_one_keeps_every_unit_whatever_the_profile_offers(schedule):
    """Rank-deficient statistics give cheaper options of zero error, and sums of prices round: at
    budget 1 the plan still keeps every unit whole."""
    from shrink.planning.schedules import make_plan

    third = 1 / 3  # prices that do not add up exactly in floating point
    curves = [
        Curve(
            b,
            "mlp",
            ("mlp",),
            3 * third,
            [Option(third, 0.0, {"neurons": 1}), Option(3 * third, 0.0, {"neurons": 3})],
        )
        for b in range(7)
    ]
    table = CostTable(
        BudgetUnit.params, [{"mlp": third + third + third} for _ in curves], [0.0] * len(curves)
    )
    plan = make_plan(schedule, PlanInputs(table, 1.0, curves=curves, schedule=schedule))
    assert all(f == 1.0 for sites in plan.targets.values() for f in sites.values())
    assert all(c["mlp"]["neurons"] == 3 for c in plan.choices.values())
