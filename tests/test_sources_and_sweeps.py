"""Model sources other than packaged/tiny, and Hydra multirun through the launcher."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from shrink.models import load_model

from .conftest import FAST, FAST_PPL, ROOT, make_cfg


def test_local_safetensors_folder(run_job, tmp_path):
    tiny = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0)
    folder = tmp_path / "local-model"
    tiny.model.save_pretrained(folder, safe_serialization=True)
    tiny.tokenizer.save_pretrained(folder)
    assert any(folder.glob("*.safetensors"))
    metrics, _ = run_job(
        "model=tiny-llama", "model.source=local", f"model.path={folder}", *FAST, *FAST_PPL, "save_model=false"
    )
    assert metrics["budget_achieved"] <= 0.5 and metrics["params_dense"] == sum(
        p.numel() for p in tiny.model.parameters()
    )


def test_multirun_with_hydra_grammar(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "launch.py",
        "-m",
        "model=tiny-llama",
        "method=svd",
        "budget=0.5,0.8",
        *FAST,
        *FAST_PPL,
        f"hydra.sweep.dir={sweep}",
        "save_model=false",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(sweep.glob("*/metrics.json"))
    budgets = sorted(json.loads(p.read_text())["budget"] for p in runs)
    assert budgets == [0.5, 0.8]
    assert all(
        json.loads(p.read_text())["budget_achieved"] <= json.loads(p.read_text())["budget"] for p in runs
    )
