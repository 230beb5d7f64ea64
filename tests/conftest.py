"""Shared fixtures: compose configs with Hydra's API and run jobs in temporary folders."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import shrink.config  # noqa: F401  (registers schemas)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["tiny-llama", "tiny-opt", "tiny-bert", "tiny-qwen2", "tiny-distilbert"]
ENCODERS = {"tiny-bert", "tiny-distilbert"}
# Small enough that a whole job takes a second or two on a tiny model.
FAST = ["logger=none", "calib.nsamples=4", "calib.seq_len=64", "calib.batch_size=2", "device=cpu"]
FAST_PPL = ["eval=ppl", "eval.ppl.seq_len=128", "eval.ppl.max_tokens=1024"]

os.environ.setdefault("WANDB_SILENT", "true")
# Dense-evaluation cache: one fresh folder per test session, never the user's cache.
os.environ["SHRINK_EVAL_CACHE"] = tempfile.mkdtemp(prefix="shrink-eval-cache-")


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tiny_overrides(model: str) -> list[str]:
    """Encoders have no perplexity; causal tiny models evaluate on a short test text."""
    return [f"model={model}", *FAST, *(["eval=none"] if model in ENCODERS else FAST_PPL)]


def sharded_copy(tmp_path, model_name: str):
    """A tiny random model saved as several safetensors shards, with its tokenizer."""
    from shrink.models import load_model

    tiny = load_model(make_cfg(f"model={model_name}").model, torch.float32, seed=0)
    folder = tmp_path / f"{model_name}-sharded"
    tiny.model.save_pretrained(folder, max_shard_size="40KB")
    tiny.tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").exists()
    return folder


def interrupt_then_resume(monkeypatch, overrides: list[str], folder: Path) -> dict:
    """Run a job that is killed right after block 0 is checkpointed, check what it leaves, resume
    it with `resume=true`; returns the resumed run's metrics."""
    from shrink.pipeline import run
    from shrink.progress import Progress

    real_save = Progress.save_block

    def save_then_die(self, index, *args, **kwargs):
        real_save(self, index, *args, **kwargs)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "save_block", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(*overrides), run_dir=folder)
    assert json.loads((folder / "metrics.json").read_text())["status"] == "failed"
    assert json.loads((folder / "progress" / "state.json").read_text())["finished"] == 0
    monkeypatch.setattr(Progress, "save_block", real_save)
    run(make_cfg(*overrides, "resume=true"), run_dir=folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["resumed_after_block"] == 0
    assert not (folder / "error.txt").exists()  # the interrupted run's traceback went with it
    return metrics


@pytest.fixture
def run_job(tmp_path):
    """Run one job from overrides; returns (metrics, run folder)."""
    from shrink.pipeline import run

    def _run(*overrides: str, name: str = "run"):
        folder = tmp_path / name
        run(make_cfg(*overrides), run_dir=folder)
        return json.loads((folder / "metrics.json").read_text()), folder

    return _run


def logits(model, ids):
    """Logits of a causal/masked LM, or last hidden states of a bare encoder."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def saved_logits(monkeypatch):
    """Records the in-memory compressed model's logits on `ids` at the moment it is saved."""
    from shrink import checkpoint

    ids = torch.randint(0, 255, (2, 48))
    seen: dict = {"ids": ids}
    real_save = checkpoint.save

    def save_and_remember(model_obj, *args, **kwargs):
        seen["logits"] = logits(model_obj, ids)
        return real_save(model_obj, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_and_remember)
    return seen
