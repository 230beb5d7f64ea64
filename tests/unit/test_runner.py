"""The layer-wise runner, statistics and error measures against direct computation."""

from __future__ import annotations

import json

import torch

from shrink.linalg.decompositions import output_error, truncated_svd
from shrink.linalg.moments import SecondMoment

from ..conftest import FAST, FAST_PPL


def test_streaming_second_moment_matches_direct():
    x = torch.randn(3, 50, 16, dtype=torch.float32)
    acc = SecondMoment(16)
    for chunk in x:
        acc.update(chunk)
    flat = x.reshape(-1, 16).double()
    assert torch.allclose(acc.moment(), flat.T @ flat / 150)
    assert torch.allclose(acc.mean(), flat.mean(0))


def test_output_error_equals_error_on_data():
    torch.manual_seed(0)
    x = torch.randn(400, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    w = torch.randn(40, 24, dtype=torch.float64)
    left, right, _ = truncated_svd(w, 6)
    acc = SecondMoment(24)
    acc.update(x)
    direct = torch.linalg.norm(x @ (w - left @ right).T) / torch.linalg.norm(x @ w.T)
    assert abs(output_error(w - left @ right, w, acc.moment()) - float(direct)) < 1e-10


def test_svd_factors_are_the_best_rank_r():
    torch.manual_seed(0)
    w = torch.randn(30, 20, dtype=torch.float64)
    left, right, s = truncated_svd(w, 5)
    assert abs(torch.linalg.norm(w - left @ right) - s[5:].norm()) < 1e-10


def test_layers_and_spectra_are_written(run_job):
    metrics, folder = run_job(
        "model=tiny-llama", "method=svd", *FAST, *FAST_PPL, "logger=jsonl", "save_model=false"
    )
    rows = [json.loads(line) for line in (folder / "layers.jsonl").read_text().splitlines()]
    assert {r["block"] for r in rows} == {0, 1}
    assert {r["linear"] for r in rows} >= {"self_attn.q_proj", "mlp.down_proj"}
    assert all(0 <= r["rel_error"] < 1.5 and r["params_kept"] <= r["params_dense"] for r in rows)
    # the run's resident memory at each block's end and its peak so far, never above the run's
    memory = [(r["rss_mb"], r["peak_rss_mb"]) for r in rows]
    assert all(0 < now <= peak <= metrics["peak_rss_mb"] + 0.05 for now, peak in memory), memory  # rounded
    spectra = dict(__import__("numpy").load(folder / "spectra.npz"))
    assert (folder / "spectra.png").stat().st_size > 1000 and (folder / "kept.png").is_file()
    assert len(spectra) == len(rows) and all((v[:-1] >= v[1:]).all() for v in spectra.values())
    events = [json.loads(line)["event"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "finish" and events.count("block") == 2
    assert set(metrics) >= {
        "model",
        "method",
        "schedule",
        "budget",
        "budget_unit",
        "budget_achieved",
        "params_dense",
        "params_compressed",
        "block_params_dense",
        "block_params_compressed",
        "block_macs_dense",
        "block_macs_compressed",
        "compress_seconds",
        "peak_rss_mb",
        "seed",
        "eval",
    }
    assert metrics["eval"]["ppl"]["wiki"]["dense"] > 1 and metrics["eval"]["ppl"]["wiki"]["compressed"] > 1


def test_wandb_offline_backend(run_job, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _, folder = run_job("model=tiny-opt", *FAST, *FAST_PPL, "logger=wandb", "save_model=false")
    runs = list((folder / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_adapters_describe_every_family():
    import torch

    from shrink.models import load_model

    from ..conftest import TINY, make_cfg

    expected_kv = {"tiny-llama": 2, "tiny-qwen2": 2, "tiny-opt": 4, "tiny-bert": 4, "tiny-distilbert": 4}
    for name in TINY:
        loaded = load_model(make_cfg(f"model={name}").model, torch.float32)
        adapter = loaded.adapter
        heads = adapter.heads()
        assert (heads.n_heads, heads.n_kv_heads, heads.head_dim) == (4, expected_kv[name], 16)
        for block in adapter.blocks():
            sites = adapter.sites(block)
            assert [s.name for s in sites] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
            for site in sites:
                ins = {block.get_submodule(p).in_features for p in site.linears}
                assert len(ins) == 1, f"{name} {site.name}: linears of one site must share an input"


def test_autocast_forwards_keep_the_statistics_close_and_the_stream_in_float32():
    """`calib.autocast=bfloat16`: the blocks run in bf16 on the calibration windows; the sites'
    moments stay within bf16's rounding of the float32 ones, and the stream between blocks stays
    float32."""
    from shrink.blocks.placement import OnDevice
    from shrink.blocks.runner import Runner
    from shrink.config import Propagate
    from shrink.models import load_model

    from ..conftest import make_cfg, tiny_overrides

    loaded = load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=0)
    windows = torch.randint(0, 255, (4, 32), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    seen = {}
    for autocast in (None, torch.bfloat16):
        runner = Runner(loaded.adapter, windows, 2, cpu, OnDevice(cpu), autocast=autocast)
        ctx = next(iter(runner.blocks(Propagate.dense, desc="test")))
        seen[autocast] = (ctx.stats["mlp_out"].xtx.clone(), runner.advance(ctx)[0])
    (full, out_full), (half, out_half) = seen[None], seen[torch.bfloat16]
    gap = float((half - full).norm() / full.norm())
    assert 0 < gap < 3e-2
    assert out_half[0].dtype == torch.float32
    assert float((out_half[0] - out_full[0]).norm() / out_full[0].norm()) < 3e-2


def test_planning_runner_reads_its_first_windows_under_its_own_autocast():
    """`calib.profile_share` / `profile_autocast`: the planning pass sees only the first windows
    (its moments are exactly those of a runner given just them) and runs them under its autocast,
    while the runner it came from keeps every window in the model's dtype."""
    from shrink.blocks.placement import OnDevice
    from shrink.blocks.runner import Runner
    from shrink.config import Propagate
    from shrink.models import load_model

    from ..conftest import make_cfg, tiny_overrides

    loaded = load_model(make_cfg(*tiny_overrides("tiny-llama")).model, torch.float32, seed=0)
    windows = torch.randint(0, 255, (6, 32), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    runner = Runner(loaded.adapter, windows, 2, cpu, OnDevice(cpu))
    first = next(iter(runner.for_planning(4 / 6, None).blocks(Propagate.dense, desc="test")))
    alone = next(iter(Runner(loaded.adapter, windows[:4], 2, cpu, OnDevice(cpu)).blocks(Propagate.dense)))
    assert first.stats["mlp_out"].count == 4 * 32
    assert torch.equal(first.stats["mlp_out"].xtx, alone.stats["mlp_out"].xtx)
    planner = runner.for_planning(1.0, torch.bfloat16)
    assert planner.windows is windows and planner.autocast == torch.bfloat16
    whole = next(iter(runner.blocks(Propagate.dense, desc="test")))
    assert whole.stats["mlp_out"].count == 6 * 32 and whole.autocast is None
