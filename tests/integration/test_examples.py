"""Every script of examples/ runs as a user runs it, on a tiny model with its --quick settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ..conftest import ROOT

EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))
MODELS = {"encoder_glue.py": "tiny-bert"}
PRINTS = {
    "compress_and_generate.py": "generated:",
    "compare_methods.py": "| tiny-llama | svdllm | uniform | 0.5 |",
    "quantize_after_id.py": "bits per block weight 5.00",
    "encoder_glue.py": "sst2  dense",
}


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES} == set(PRINTS)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    model = MODELS.get(script.name, "tiny-llama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, str(script), "--model", model, "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert PRINTS[script.name] in out.stdout, out.stdout[-2000:]
