"""Every script of examples/ runs as a user runs it, on a tiny model with its --quick settings."""

from __future__ import annotations

import runpy
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
def test_example_runs(script, monkeypatch, capsys):
    """As `python examples/<script> --model <tiny> --quick` runs it, in this process (the imports
    are paid once)."""
    model = MODELS.get(script.name, "tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [str(script), "--model", model, "--quick"])
    monkeypatch.syspath_prepend(str(script.parent))  # as Python puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")
    assert PRINTS[script.name] in capsys.readouterr().out
