"""Sweeps (`sweeps/`, launcher plugins, failed jobs recorded) and resuming an interrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from shrink.errors import ShrinkError
from shrink.run import report
from shrink.run.pipeline import run
from shrink.run.progress import Progress

from ..conftest import FAST, FAST_PPL, ROOT, interrupt_then_resume, make_cfg


def _sweep(*overrides: str, name: str = "tiny", failed: int = 0) -> subprocess.CompletedProcess:
    """Run a ready sweep; a sweep with failed jobs finishes them all, then exits with code 1."""
    cmd = [sys.executable, "launch.py", "-m", "-cd", "sweeps", "-cn", name, *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == (1 if failed else 0), out.stderr[-3000:]
    closing = [line for line in out.stderr.splitlines() if line.startswith("sweep ")]
    assert len(closing) == 1 and closing[0].endswith(f", {failed} failed, 0 unfinished"), out.stderr[-3000:]
    return out


def test_a_sweep_with_failing_jobs_finishes_and_reports_them(tmp_path):
    """2 methods × 2 budgets in parallel (joblib); budget 1.5 fails, the other two complete."""
    sweep = tmp_path / "sweep"
    _sweep(
        "budget=0.5,1.5",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        failed=2,
    )
    runs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert len(runs) == 4
    ok = {name: m for name, m in runs.items() if m["status"] == "ok"}
    assert sorted((m["method"], m["budget"]) for m in ok.values()) == [("id", 0.5), ("svd", 0.5)]
    for name, m in ok.items():
        assert m["budget_achieved"] <= m["budget"] and (sweep / name / "model" / "manifest.json").is_file()
        assert not (sweep / name / "progress").exists()  # per-block checkpoints go once a run is done
        start = json.loads((sweep / name / "events.jsonl").read_text().splitlines()[0])
        assert start["group"] == "sweep" and start["name"] == name.split("_", 1)[1]
    failed = [m for m in runs.values() if m["status"] == "failed"]
    assert len(failed) == 2 and all("outside (0, 1]" in m["error"] for m in failed)

    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert table.count("failed: ShrinkError: budget 1.5") == 2 and table.count("| ok |") == 2


def test_the_submitit_launcher_runs_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    _sweep("hydra/launcher=submitit_local", "method=id", f"hydra.sweep.dir={sweep}")
    statuses = [json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")]
    assert statuses == ["ok", "ok"]


def test_the_optuna_sweeper_searches_a_schedule_parameter(tmp_path):
    """sweeps/optuna-greedy on a tiny model (basic launcher): TPE samples greedy's min_keep from
    [0, 0.75] with a fixed seed; the second trial (0.54 > budget 0.5) fails validation, is recorded
    and the search goes on; the best value is the lowest compressed perplexity of the other two."""
    sweep = tmp_path / "sweep"
    overrides = ["model=tiny-llama", *FAST, *FAST_PPL, "hydra.sweeper.n_trials=3"]
    _sweep(
        *overrides,
        "schedule.min_keep=interval(0.0,0.75)",
        f"hydra.sweep.dir={sweep}",
        name="optuna-greedy",
        failed=1,
    )
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert [m["status"] for m in runs] == ["ok", "failed", "ok"]
    assert "min_keep" in runs[1]["error"]
    ok = [m for m in runs if m["status"] == "ok"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(m["eval"]["ppl"]["wiki"]["compressed"] for m in ok)
    assert 0.0 <= best["best_params"]["schedule.min_keep"] <= 0.5


def test_every_ready_sweep_composes():
    from hydra import compose, initialize_config_dir

    for name in ("methods", "methods-budgets", "schedules", "paper-grid", "tiny", "optuna-greedy"):
        with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
            cfg = compose(name, [f"hydra.searchpath=[file://{ROOT / 'conf'}]"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params, name


def test_the_methods_sweep_and_the_leaderboard_hold_every_method():
    import importlib.util

    from shrink.methods import METHODS

    sweep = yaml.safe_load((ROOT / "sweeps" / "methods.yaml").read_text())
    assert sorted(sweep["hydra"]["sweeper"]["params"]["method"].split(",")) == sorted(METHODS.names())
    spec = importlib.util.spec_from_file_location("leaderboard", ROOT / "bench" / "leaderboard.py")
    leaderboard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(leaderboard)
    assert sorted(leaderboard.METHODS) == sorted(METHODS.names())


def test_a_job_failing_mid_run_records_why(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(ShrinkError, match="fewer than seq_len"):
        run(make_cfg("model=tiny-llama", *FAST, *FAST_PPL, "eval.ppl.max_tokens=64"), run_dir=folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "fewer than seq_len" in metrics["error"]
    assert metrics["model"] == "tiny-llama" and "Traceback" in (folder / "error.txt").read_text()


RESUMABLE = {
    "id": ["model=tiny-llama", "method=id"],
    "distill": ["model=tiny-llama", "method=distill", "method.steps=4", "method.eval_every=2"],
    "svdllm-greedy": ["model=tiny-opt", "method=svdllm", "schedule=greedy", "budget=0.6"],
    "rom-dense": ["model=tiny-qwen2", "method=rom", "propagate=dense", "model.tiny.num_hidden_layers=3"],
    "id-gptq": [
        "model=tiny-llama",
        "method=id",
        "budget=0.7",
        "quant=gptq",
        "quant.group_size=32",
        "quant.sym=false",
        "quant.lowrank=4",
    ],
}


@pytest.mark.parametrize("case", list(RESUMABLE))
def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch, case):
    overrides = [*RESUMABLE[case], *FAST, *FAST_PPL]
    whole = tmp_path / "whole"
    run(make_cfg(*overrides), run_dir=whole)

    folder = tmp_path / "resumed"
    metrics = interrupt_then_resume(monkeypatch, overrides, folder)
    a, b = (
        load_file(str(whole / "model" / "model.safetensors")),
        load_file(str(folder / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    def rows(path):
        measured = ("seconds", "_mb")  # times and memory differ from run to run
        return [{k: v for k, v in json.loads(row).items() if not k.endswith(measured)} for row in path.open()]

    assert rows(folder / "layers.jsonl") == rows(whole / "layers.jsonl")
    assert metrics["eval"]["ppl"] == json.loads((whole / "metrics.json").read_text())["eval"]["ppl"]
    assert not (folder / "progress").exists()


def test_resume_skips_a_finished_run_and_refuses_another_config(tmp_path, monkeypatch):
    overrides = ["model=tiny-llama", *FAST, *FAST_PPL]
    folder = tmp_path / "run"
    first = run(make_cfg(*overrides), run_dir=folder)
    stamp = (folder / "metrics.json").stat().st_mtime_ns
    assert run(make_cfg(*overrides, "resume=true"), run_dir=folder) == first
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp  # not run again

    def die(self, index, *args, **kwargs):
        raise KeyboardInterrupt

    real_save = Progress.save_block
    monkeypatch.setattr(
        Progress, "save_block", lambda self, i, *a, **k: (real_save(self, i, *a, **k), die(self, i))
    )
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*overrides), run_dir=tmp_path / "other")
    with pytest.raises(ShrinkError, match="different config.*differs in: budget"):
        run(make_cfg(*overrides, "budget=0.7", "resume=true"), run_dir=tmp_path / "other")


def _record(folder, overrides: list[str], config_name: str = "config", sweep: bool = False):
    """What Hydra leaves in a run folder (`.hydra/`) or a sweep folder (`multirun.yaml`)."""
    hydra = {"job": {"config_name": config_name}, "overrides": {"task": overrides}}
    if sweep:
        folder.mkdir(parents=True)
        (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    else:
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))


def test_resume_takes_the_folders_own_overrides(tmp_path):
    from shrink.run.cli import resume_arguments, resume_command

    folder = tmp_path / "run"
    _record(folder, ["model=tiny-llama", "budget=0.7", "+experiment=smoke"], config_name="mine")
    args, note = resume_arguments(["resume=true", f"hydra.run.dir={folder}", "budget=0.8"])
    assert args == [
        "-cn", "mine", "model=tiny-llama", "+experiment=smoke", "resume=true", f"hydra.run.dir={folder}",
        "budget=0.8",
    ]  # fmt: skip
    assert "model=tiny-llama" in note
    assert resume_arguments(["budget=0.8", f"hydra.run.dir={folder}"]) == (
        ["budget=0.8", f"hydra.run.dir={folder}"],
        None,
    )
    assert resume_command(tmp_path / "nothing", False, "launch.py") is None  # never began

    sweep = tmp_path / "sweep"
    _record(sweep, ["budget=0.5,0.8", "model=tiny-llama"], sweep=True)
    args, _ = resume_arguments(["-m", "resume=true", f"hydra.sweep.dir={sweep}"])
    assert args == ["-m", "budget=0.5,0.8", "model=tiny-llama", "resume=true", f"hydra.sweep.dir={sweep}"]
    assert resume_command(sweep, True, "launch.py").endswith(
        f"launch.py -m resume=true hydra.sweep.dir={sweep}"
    )


def test_a_folder_with_a_run_is_continued_or_replaced_never_overwritten(tmp_path):
    overrides = ["model=tiny-llama", *FAST, *FAST_PPL]
    folder = tmp_path / "run"
    run(make_cfg(*overrides), run_dir=folder)
    first = (folder / "metrics.json").read_text()
    (folder / "notes.txt").write_text("left by the earlier run")
    with pytest.raises(ShrinkError, match="holds a finished run: resume=true continues it .* overwrite=true"):
        run(make_cfg(*overrides, "budget=0.7"), run_dir=folder)
    assert (folder / "metrics.json").read_text() == first
    with pytest.raises(ShrinkError, match="resume=true .* overwrite=true .*: choose one"):
        run(make_cfg(*overrides, "resume=true", "overwrite=true"), run_dir=folder)
    run(make_cfg(*overrides, "budget=0.7", "overwrite=true"), run_dir=folder)
    assert json.loads((folder / "metrics.json").read_text())["budget"] == 0.7
    assert not (folder / "notes.txt").exists()
