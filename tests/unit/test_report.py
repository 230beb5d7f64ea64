"""`python -m shrink report`: one table and one plot from many run folders, failed runs marked."""

from __future__ import annotations

import json

import pytest

from shrink.run import report
from shrink.run.summary import closing_summary


def _metrics(folder, method, budget, ppl, status="ok", **extra):
    folder.mkdir(parents=True)
    m = {
        "status": status,
        "model": "m",
        "method": method,
        "schedule": "uniform",
        "budget": budget,
        "budget_achieved": budget - 0.001,
        "compress_seconds": 1.5,
        "eval": {"ppl": {"wiki": {"dense": 10.0, "compressed": ppl}}} if ppl else {},
        **extra,
    }
    (folder / "metrics.json").write_text(json.dumps(m))


def test_report_collects_runs_into_a_table_csv_and_plot(tmp_path, capsys):
    runs = tmp_path / "runs"
    _metrics(runs / "a", "id", 0.5, 30.0)
    _metrics(runs / "b", "id", 0.8, 15.0)
    _metrics(runs / "nested" / "c", "svd", 0.5, 900.0)
    _metrics(runs / "d", "svd", 0.8, None, status="failed", error="ShrinkError: boom")
    (runs / "unfinished").mkdir()  # no metrics.json: not a run
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| model | method | schedule | budget | achieved | ppl_dense | ppl |")
    body = printed[2:]
    assert [line.split(" | ")[1:4] for line in body] == [
        ["id", "uniform", "0.8"],
        ["id", "uniform", "0.5"],
        ["svd", "uniform", "0.8"],
        ["svd", "uniform", "0.5"],
    ]
    assert "| 30 |" in body[1] and "| 0.499 |" in body[1]
    assert "failed: ShrinkError: boom" in body[2]
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("model,method,schedule,budget")
    assert (out / "ppl_vs_budget.png").stat().st_size > 1000
    assert (out / "report.md").read_text().splitlines() == printed


def test_report_on_nothing_fails_clearly(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_the_dense_evaluation_is_cached_across_runs(run_job, monkeypatch, tmp_path):
    from ..conftest import tiny_overrides

    monkeypatch.setenv("SHRINK_EVAL_CACHE", str(tmp_path / "cache"))  # empty, whatever ran before

    base = [*tiny_overrides("tiny-llama"), "method=svd", "save_model=false", "eval.ppl.max_tokens=512"]
    first, _ = run_job(*base, "budget=0.8", name="first")
    second, _ = run_job(*base, "budget=0.6", name="second")
    off, _ = run_job(*base, "budget=0.6", "eval.cache_dense=false", name="off")
    other_seed, _ = run_job(*base, "budget=0.6", "seed=1", name="seed")
    assert "dense_cached" not in first["eval"] and second["eval"]["dense_cached"] == ["ppl.wiki"]
    assert second["eval"]["ppl"]["wiki"]["dense"] == first["eval"]["ppl"]["wiki"]["dense"]
    assert "dense_cached" not in off["eval"] and "dense_cached" not in other_seed["eval"]


def test_speed_suite_reports_latency_next_to_the_mac_ratio(run_job):
    from ..conftest import tiny_overrides

    metrics, folder = run_job(
        *tiny_overrides("tiny-llama"), "method=id", "budget=0.5", "eval=speed", "eval.speed.repeats=2",
        "eval.speed.seq_len=64", "eval.ppl.max_tokens=512", "eval.ppl.seq_len=128",
    )  # fmt: skip
    speed = metrics["eval"]["speed"]
    for which in ("dense", "compressed"):
        timed = speed[which]
        assert timed["batch_size"] == 1 and timed["seq_len"] == 64
        assert timed["tokens_per_s"] == pytest.approx(64 * 1000 / timed["latency_ms"])
    assert speed["speedup"] == pytest.approx(speed["dense"]["latency_ms"] / speed["compressed"]["latency_ms"])
    # the LM head is not compressed, so the whole model's MAC ratio lies between the blocks' and 1;
    # the blocks' includes attention-score MACs, which thinned value heads do not shrink (zero
    # padded), so it may exceed the params budget of 0.5
    assert 0 < speed["block_mac_ratio"] < 1 and speed["block_mac_ratio"] < speed["model_mac_ratio"] < 1
    assert speed["weight_bytes_ratio"] < 1
    files = [f for f in (folder / "model").rglob("*") if f.is_file() and f.name != "README.md"]  # card: later
    stored = sum(f.stat().st_size for f in files) / 2**20
    assert metrics["checkpoint_mb"] == pytest.approx(stored)


def test_speed_suite_times_quantized_linears_on_integer_kernels(run_job, capfd):
    from ..conftest import tiny_overrides

    metrics, folder = run_job(
        *tiny_overrides("tiny-llama"), "method=id", "budget=1.0", "schedule=uniform", "quant=rtn",
        "quant.bits=4", "quant.group_size=32", "eval=speed", "eval.speed.repeats=1", "eval.speed.seq_len=32",
        "eval.speed.decode_tokens=3", "eval.ppl.max_tokens=512", "eval.ppl.seq_len=128", "save_model=false",
    )  # fmt: skip
    speed = metrics["eval"]["speed"]
    decode = speed["dense"]["decode_ms_per_token"] / speed["compressed"]["decode_ms_per_token"]
    assert speed["decode_speedup"] == pytest.approx(decode)
    kernels = speed["compressed"]["kernels"]
    assert kernels["kernel_linears"] == kernels["quantized_linears"] == 14  # 7 linears × 2 blocks
    assert speed["kernel_speedup"] == pytest.approx(speed["dense"]["latency_ms"] / kernels["latency_ms"])
    assert 0 < kernels["logits_max_rel_diff"] < 2e-2  # bfloat16 activations and scales, nothing more
    # 4-bit codes and a scale per 32 weights in memory; the float embedding is what stays
    assert speed["kernel_weight_bytes_ratio"] < 0.35 < speed["weight_bytes_ratio"]
    assert {"kernel_speedup", "kernel_decode_speedup", "decode_speedup"} <= set(speed)
    assert "kernels    14 of 14 quantized linears on integer kernels" in closing_summary(metrics, folder)
    bars = capfd.readouterr().err  # a progress bar for each timing, as for every evaluation
    for desc in ("speed (dense)", "speed (compressed)", "speed (compressed) on integer kernels"):
        assert f"{desc}:" in bars


def test_speed_suite_runs_on_an_encoder(run_job):
    metrics, _ = run_job(
        "model=tiny-bert", "logger=none", "calib.nsamples=4", "calib.seq_len=64", "calib.batch_size=2",
        "device=cpu", "eval=speed", "eval.ppl=null", "eval.speed.repeats=1", "eval.speed.seq_len=32",
        "save_model=false",
    )  # fmt: skip
    speed = metrics["eval"]["speed"]
    assert speed["speedup"] == pytest.approx(speed["dense"]["latency_ms"] / speed["compressed"]["latency_ms"])
    assert "ppl" not in metrics["eval"]  # an encoder has no perplexity


def test_report_shows_the_glue_score(tmp_path):
    glue = {
        "cosine": {"value": 0.9},
        "mrpc": {"metric": "accuracy", "n": 408, "dense": 0.86, "compressed": 0.81},
    }
    _metrics(tmp_path / "g", "id", 0.5, None, eval={"glue": glue})
    row = report.row_of(tmp_path / "g" / "metrics.json")
    assert (row["glue_task"], row["glue_dense"], row["glue"]) == ("mrpc (accuracy)", 0.86, 0.81)
