"""Model sources other than packaged and tiny: a local safetensors folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import yaml

from shrink.models import load_model

from ..conftest import FAST, FAST_PPL, ROOT, make_cfg


def test_local_safetensors_folder(run_job, tmp_path):
    tiny = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0)
    folder = tmp_path / "local-model"
    tiny.model.save_pretrained(folder, safe_serialization=True)
    tiny.tokenizer.save_pretrained(folder)
    metrics, _ = run_job("model=local", f"model.path={folder}", *FAST, *FAST_PPL, "save_model=false")
    assert metrics["budget_achieved"] <= 0.5 and metrics["params_dense"] == sum(
        p.numel() for p in tiny.model.parameters()
    )


def test_a_local_model_is_labelled_by_its_folder(tmp_path):
    """`python launch.py model=local model.path=…/my-model`: the run folder, metrics, summary,
    model card and tracker's run are named after the folder, and the card names a base model only
    when told one."""
    tiny = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0)
    folder = tmp_path / "models" / "my-model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    work = tmp_path / "work"
    work.mkdir()
    args = ["model=local", f"model.path={folder}", "model.base_model=org/base", *FAST[1:], *FAST_PPL]
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args, "logger=jsonl"], cwd=work, capture_output=True,
        text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("shrink: my-model  method=id")
    (run_folder,) = (work / "outputs" / "my-model").glob("*/*")
    assert json.loads((run_folder / "metrics.json").read_text())["model"] == "my-model"
    start = json.loads((run_folder / "events.jsonl").read_text().splitlines()[0])
    assert start["name"] == "my-model-id-greedy-residual-b0.5"
    card = (run_folder / "model" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "org/base" and "# my-model, compressed by shrink" in card
    assert "smollm2" not in card.lower()
