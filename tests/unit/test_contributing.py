"""docs/contributing.md's method, followed to the letter: its Python block registers the method,
its YAML block is the config file, and the method runs under the pipeline's own checks."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import shrink
from shrink.methods import METHODS
from shrink.models import load_model
from shrink.run.validation import validate

from ..conftest import FAST, compress_in_memory, logits, make_cfg

PAGE = Path(__file__).resolve().parents[2] / "docs" / "contributing.md"


def _block(language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)
    return blocks[0]


@pytest.fixture
def asvd(tmp_path):
    module = types.ModuleType("shrink.methods.asvd")
    sys.modules[module.__name__] = module
    exec(compile(_block("python"), str(PAGE), "exec"), module.__dict__)
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "asvd.yaml").write_text(_block("yaml"))
    yield [f"hydra.searchpath=[file://{tmp_path}]", "method=asvd"]
    METHODS._entries.pop("asvd", None)
    sys.modules.pop(module.__name__, None)


def test_the_documented_method_runs_within_its_budget(asvd):
    overrides = [*asvd, "model=tiny-llama", *FAST, "budget=0.6", "schedule=uniform"]
    validate(make_cfg(*overrides), ([], False))
    done = compress_in_memory(*overrides)
    assert done.achieved <= 0.6 + 1e-9
    assert "asvd" in METHODS.names()


def test_the_documented_method_keeps_the_logits_at_budget_one(asvd, tmp_path):
    overrides = [*asvd, "model=tiny-llama", *FAST, "budget=1.0", "schedule=uniform"]
    done = compress_in_memory(*overrides)
    dense = load_model(make_cfg("model=tiny-llama").model, torch.float32, seed=0).model
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(shrink.load(done.save(tmp_path / "model")), ids), logits(dense, ids))


def test_its_schema_rejects_an_unknown_key(asvd):
    with pytest.raises(Exception, match="nope"):
        make_cfg(*asvd, "model=tiny-llama", "method.nope=1")
