"""What a new user hits: concurrent runs, stale resumes, late failures, tracebacks where
one line is promised, exit codes that hide failure, silent nonsense in results."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from shrink.errors import ShrinkError
from shrink.evaluation.suite import speed_ratios
from shrink.run import report
from shrink.run.cli import one_line_error, override_under_null
from shrink.run.lock import FolderBusy, is_locked, locked
from shrink.run.pipeline import run
from shrink.run.summary import closing_summary

from ..conftest import CONF, FAST, FAST_PPL, ROOT, make_cfg

TINY_RUN = ["model=tiny-llama", *FAST, *FAST_PPL]


def launch(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (ns)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


# 1. two runs in one folder


def test_a_second_process_in_a_busy_folder_fails_and_touches_nothing(tmp_path):
    """A finished run's folder is held by another process (its lock); a launch into it fails with
    one line and exit 2, and no file there changes. Once the holder exits, the lock is gone."""
    folder = tmp_path / "run"
    run(make_cfg(*TINY_RUN), run_dir=folder)
    before = snapshot(folder)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from shrink.run.lock import locked\n"
         f"with locked({str(folder)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked" and is_locked(folder)
        out = launch(*TINY_RUN, "logger=jsonl", f"hydra.run.dir={folder}")
    finally:
        holder.communicate("", timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(error_lines(out.stderr)) == 1 and "in use by another shrink process" in out.stderr
    assert "Traceback" not in out.stderr
    assert snapshot(folder) == before
    assert not is_locked(folder)  # released when the holding process ended


def test_the_lock_is_exclusive_and_reentrant_within_a_process(tmp_path):
    with locked(tmp_path / "run"), locked(tmp_path / "run"):  # taken again by the same process
        assert is_locked(tmp_path / "run")
    assert not is_locked(tmp_path / "run")
    probe = "import sys; from shrink.run.lock import locked\nwith locked(sys.argv[1]): pass"
    with locked(tmp_path / "run"):
        other = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path / "run")], cwd=ROOT, capture_output=True
        )
    assert other.returncode != 0 and FolderBusy.__name__ in other.stderr.decode()


def test_a_filesystem_without_locks_still_runs(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with locked(tmp_path / "run"):
        assert is_locked(tmp_path / "run")  # this process holds it, as far as it knows
    assert "concurrent runs there are not detected" in caplog.text
    assert not is_locked(tmp_path / "run")


def test_default_folders_started_in_the_same_second_differ():
    def run_dir() -> str:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", return_hydra_config=True).hydra.run.dir

    first, second = run_dir(), run_dir()
    assert first != second and re.search(r"\d{2}-\d{2}-\d{2}-\d{6}$", first), (first, second)


# 2. resume of a finished folder


def test_resume_refuses_a_finished_run_under_another_config(tmp_path):
    folder = tmp_path / "run"
    run(make_cfg(*TINY_RUN, "budget=0.5"), run_dir=folder)
    before = snapshot(folder)
    with pytest.raises(ShrinkError, match=r"finished under a different config \(differs in: budget\)"):
        run(make_cfg(*TINY_RUN, "budget=0.8", "resume=true"), run_dir=folder)
    with pytest.raises(ShrinkError, match=r"differs in: eval.ppl.max_tokens"):
        run(make_cfg(*TINY_RUN, "eval.ppl.max_tokens=512", "resume=true"), run_dir=folder)
    assert snapshot(folder) == before
    metrics = json.loads((folder / "metrics.json").read_text())
    # the same config is skipped and answers with the finished run's objective
    skipped = run(make_cfg(*TINY_RUN, "budget=0.5", "resume=true", "logger=jsonl"), run_dir=folder)
    assert skipped == metrics["eval"]["ppl"]["wiki"]["compressed"] and snapshot(folder) == before


def test_the_launcher_leaves_a_refused_finished_folder_as_it_was(tmp_path):
    """Hydra writes nothing before the run goes ahead (`.hydra/` is the run's own record)."""
    folder = tmp_path / "run"
    first = launch(*TINY_RUN, f"hydra.run.dir={folder}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "budget: 0.5" in (folder / ".hydra" / "config.yaml").read_text()
    before = snapshot(folder)
    out = launch(*TINY_RUN, "budget=0.8", "resume=true", f"hydra.run.dir={folder}")
    assert out.returncode == 2 and error_lines(out.stderr) == [
        f"error: cannot resume {folder}: it finished under a different config (differs in: budget); "
        "resume with the same overrides or use a new folder"
    ]
    assert snapshot(folder) == before


# 4. one line where a traceback was


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=nope", "unknown method 'nope'; valid: distill, flap, id, llm-pruner, rom, shortgpt,"),
        ("method=base_id", "unknown method 'base_id'; valid: distill, flap, id, llm-pruner, rom,"),
        ("schedule=zigzag", "unknown schedule 'zigzag'; valid: energy, first_k, greedy, greedy-residual,"),
        ("eval=everything", "unknown eval 'everything'; valid: glue, glue-hub, leaderboard, none, ppl,"),
        ("model=gpt9", "unknown model 'gpt9'; valid: bert-base, bert-glue,"),
    ],
)
def test_unknown_group_options_name_the_real_choices(override, message):
    with pytest.raises(MissingConfigException) as err:
        make_cfg(override)
    line = one_line_error(err.value)
    assert line.startswith(message) and "base_" not in line.split("valid:")[1] and "\n" not in line


def test_an_override_under_a_null_node_is_named():
    with pytest.raises(AssertionError) as err:
        make_cfg("eval=none", "eval.ppl.seq_len=2048")
    assert override_under_null(err.value).startswith("cannot set eval.ppl.seq_len: eval.ppl is null")
    with pytest.raises(AttributeError) as merged:  # a mapping merged into a null node
        make_cfg("eval=quick", "eval.speed={batch_size:1}")
    assert override_under_null(merged.value).startswith("cannot set eval.speed: eval.speed is null")


def test_launcher_turns_composition_errors_into_one_line_and_exit_2():
    for args, expected in [
        (["method=nope"], "error: unknown method 'nope'; valid: distill, flap, id, llm-pruner, rom, "),
        (["eval=none", "eval.ppl.seq_len=2048"], "error: cannot set eval.ppl.seq_len: eval.ppl is null"),
    ]:
        out = launch(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert len(error_lines(out.stderr)) == 1 and error_lines(out.stderr)[0].startswith(expected)


def test_sigint_prints_a_resume_command_that_works_when_pasted(tmp_path):
    """Interrupted mid-compression (distill trains long): exit 130, one line with the command that
    continues the run, and the folder records the failure. Pasted as printed, that command takes
    the run's own overrides from its folder (here with one more, so that it ends)."""
    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "launch.py", *TINY_RUN, "method=distill", "method.steps=1000000",
         f"hydra.run.dir={folder}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # a shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it:
        # give the child the default disposition, as a run started from a terminal has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (folder / "plan.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a million-step run behind
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    # one message; progress bars share stderr, so it is looked for anywhere, not only at line starts
    (command,) = re.findall(r"error: interrupted; continue with: (.+)", stderr)
    assert json.loads((folder / "metrics.json").read_text())["status"] == "failed"
    words = shlex.split(command)
    assert words[1:] == ["launch.py", "resume=true", f"hydra.run.dir={folder}"], command

    out = subprocess.run(
        [*words, "method.steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stderr and "method=distill" in out.stderr
    resumed = yaml.safe_load((folder / "config.yaml").read_text())
    assert resumed["method"]["name"] == "distill" and resumed["method"]["steps"] == 2
    assert resumed["calib"]["nsamples"] == 4 and resumed["model"]["name"] == "tiny-llama"
    assert json.loads((folder / "metrics.json").read_text())["status"] == "ok"


# 5. reports


def test_report_lists_killed_running_and_corrupt_runs(tmp_path):
    ok, killed, running, corrupt = (tmp_path / n for n in ("ok", "killed", "running", "corrupt"))
    run(make_cfg(*TINY_RUN), run_dir=ok)
    for folder in (killed, running, corrupt):
        folder.mkdir()
        (folder / ".shrink.run.lock").touch()
        (folder / "config.yaml").write_text((ok / "config.yaml").read_text())
    (corrupt / "metrics.json").write_text('{"status": "ok", "eval": ')
    with locked(running):
        rows = {Path(r["folder"]).name: r for r in report.report([tmp_path])}
    assert rows["ok"]["status"] == "ok"
    assert rows["killed"]["status"] == "unfinished (no metrics.json)" and rows["killed"]["method"] == "id"
    assert rows["running"]["status"] == "running"
    assert rows["corrupt"]["status"].startswith("corrupt metrics.json")


# 6. silent nonsense


def test_a_speedup_beyond_the_mac_ratio_is_flagged_unreliable():
    def table(dense_ms: float, comp_ms: float) -> dict:
        row = {"block_macs_per_token": 100, "weight_bytes": 10}
        return {
            "dense": row | {"latency_ms": dense_ms, "model_macs_per_token": 1000},
            "compressed": row | {"latency_ms": comp_ms, "model_macs_per_token": 595},
        }

    noisy = speed_ratios(table(544.0, 100.0))  # 5.44x at a MAC ratio of 0.595
    assert noisy["speedup_reliable"] is False
    assert speed_ratios(table(150.0, 100.0))["speedup_reliable"] is True


def test_speed_reports_the_spread(run_job):
    metrics, _ = run_job("model=tiny-llama", *FAST, "eval=speed", "eval.ppl.max_tokens=512",
                         "eval.ppl.seq_len=128", "eval.speed.seq_len=32", "eval.speed.repeats=5")  # fmt: skip
    speed = metrics["eval"]["speed"]
    for which in ("dense", "compressed"):
        timed = speed[which]
        assert "latency_iqr_ms" in timed and timed["latency_iqr_ms"] < 10 * timed["latency_ms"]
    speedup = speed["dense"]["latency_ms"] / speed["compressed"]["latency_ms"]
    assert speed["speedup"] == pytest.approx(speedup)
    assert speed["speedup_reliable"] == (speedup <= 1 / speed["model_mac_ratio"])


def test_summary_warns_about_a_broken_perplexity_and_a_noisy_speedup(tmp_path):
    metrics = {
        "model": "m", "method": "id", "schedule": "uniform", "budget": 0.5, "budget_unit": "params",
        "budget_achieved": 0.5, "params_dense": 1e6, "params_compressed": 5e5, "block_params_dense": 1e6,
        "block_params_compressed": 5e5, "load_seconds": 1, "compress_seconds": 1, "eval_seconds": 1,
        "total_seconds": 3, "peak_rss_mb": 1,
        "eval": {
            "ppl": {"wiki": {"dense": 18.0, "compressed": 18.0 * 2000, "tokens": 8, "seq_len": 4}},
            "speed": {"dense": {"latency_ms": 5, "latency_iqr_ms": 1, "batch_size": 1, "seq_len": 8},
                      "compressed": {"latency_ms": 1, "latency_iqr_ms": 1}, "speedup": 5.0,
                      "model_mac_ratio": 0.6, "speedup_reliable": False},
        },
    }  # fmt: skip
    text = closing_summary(metrics, tmp_path)
    assert "warning: wiki perplexity is over 1000x dense" in text
    assert "warning: speedup 5.00x exceeds 1 / MAC ratio = 1.67x" in text


def test_svdllm_logs_the_ridge_it_used(run_job):
    _, folder = run_job("model=tiny-llama", *FAST, "eval=none", "method=svdllm")
    rows = [json.loads(line) for line in (folder / "layers.jsonl").read_text().splitlines()]
    assert rows and all(row["whitening_ridge"] >= 0 for row in rows)


# 8. small ones


def test_checkpoint_files_follow_the_umask_and_metrics_record_versions(run_job):
    metrics, folder = run_job("model=tiny-llama", *FAST, "eval=none")
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (folder / "model").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    versions = metrics["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] and "git_commit" in versions


def test_load_on_a_missing_gpu_fails_with_one_line(run_job):
    import shrink

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, folder = run_job("model=tiny-llama", *FAST, "eval=none")
    with pytest.raises(ShrinkError, match="no CUDA device is available; valid here: auto, cpu"):
        shrink.load(folder / "model", device="cuda")


def test_wandb_settings_from_the_environment_apply_unless_overridden(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    cfg = make_cfg()
    assert cfg.logger.mode.value == "disabled" and cfg.logger.project == "from-env"
    cfg = make_cfg("logger.mode=offline", "logger.project=mine")
    assert cfg.logger.mode.value == "offline" and cfg.logger.project == "mine"
    monkeypatch.delenv("WANDB_MODE")
    assert make_cfg().logger.mode.value == "offline"  # the default without the environment
