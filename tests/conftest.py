"""Shared fixtures: compose configs with Hydra's API and run jobs in temporary folders."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from shrink.run.plugins import load_plugins

load_plugins()  # their schemas before any config is composed
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["tiny-llama", "tiny-opt", "tiny-bert", "tiny-qwen2", "tiny-distilbert"]
ENCODERS = {"tiny-bert", "tiny-distilbert"}
# Small enough that a whole job takes a second or two on a tiny model.
FAST = ["logger=none", "calib.nsamples=4", "calib.seq_len=64", "calib.batch_size=2", "device=cpu"]
FAST_PPL = ["eval=ppl", "eval.ppl.seq_len=128", "eval.ppl.max_tokens=1024"]

os.environ.setdefault("WANDB_SILENT", "true")
# trust_remote_code copies a checkpoint's modeling file into this cache: not the user's
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="shrink-hf-modules-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: one thread each (and in the jobs they start), or their thread
    # pools fight over the cores and both crawl.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
# Dense-evaluation cache: one fresh folder per test session, never the user's cache.
os.environ["SHRINK_EVAL_CACHE"] = tempfile.mkdtemp(prefix="shrink-eval-cache-")
os.environ["SHRINK_TEACHER_CACHE"] = tempfile.mkdtemp(prefix="shrink-teacher-cache-")


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def tiny_overrides(model: str) -> list[str]:
    """Encoders have no perplexity; causal tiny models evaluate on a short test text."""
    return [f"model={model}", *FAST, *(["eval=none"] if model in ENCODERS else FAST_PPL)]


def local_model(model_name: str, folder) -> list[str]:
    """Overrides that load a saved copy of tiny model `model_name` from `folder` (`model=local`),
    with the head the tiny config gives it."""
    head = make_cfg(f"model={model_name}").model.head
    return ["model=local", f"model.path={folder}", f"model.head={getattr(head, 'value', head)}"]


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
    from shrink.run.pipeline import run
    from shrink.run.progress import Progress

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
    from shrink.run.pipeline import run

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
    from shrink.checkpoints import save_load as checkpoint

    ids = torch.randint(0, 255, (2, 48))
    seen: dict = {"ids": ids}
    real_save = checkpoint.save

    def save_and_remember(model_obj, *args, **kwargs):
        seen["logits"] = logits(model_obj, ids)
        return real_save(model_obj, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save_and_remember)
    return seen


@dataclass
class Compressed:
    """A tiny model compressed in memory the way a run does it (plan, runner, method), without a
    run folder, evaluation or Hydra job: what budget and method tests need, in a fraction of a job."""

    loaded: Any  # shrink.models.Loaded
    plan: Any  # shrink.planning.budget.Plan
    rows: list[dict]
    dense: Any  # shrink.planning.cost.Cost of the blocks before
    kept: Any  # and after
    unit: str
    head: str  # the model's head kind, which a checkpoint records
    steps: list[dict] = field(default_factory=list)  # rows of the sparsity / quantization steps
    quant: dict | None = None  # the quant config, which a checkpoint of quantized linears needs

    @property
    def model(self):
        return self.loaded.model

    @property
    def achieved(self) -> float:
        return self.kept.of(self.unit) / self.dense.of(self.unit)

    def save(self, folder: Path) -> Path:
        from shrink.checkpoints import save_load as checkpoint

        return checkpoint.save(self.model, self.loaded.tokenizer, folder, self.head, {}, quant=self.quant)


def first_attention(name: str):
    """A tiny model's params cost model, its first block, that block's attention and head costs."""
    from shrink.models import load_model
    from shrink.planning.cost import CostModel

    adapter = load_model(make_cfg(f"model={name}").model, torch.float32, seed=0).adapter
    costs = CostModel(adapter, "params")
    block = adapter.blocks()[0]
    attention = adapter.attention(block)
    return adapter, costs, block, attention, costs.heads(attention)


def compress_in_memory(*overrides: str) -> Compressed:
    """Compose the overrides, then plan and compress exactly as `pipeline._compress` does."""
    from shrink.blocks.gradients import taylor_saliences
    from shrink.blocks.placement import OnDevice
    from shrink.blocks.runner import Runner, autocast_dtype
    from shrink.blocks.steps import BlockSteps, width_multiple
    from shrink.config import Propagate
    from shrink.data import corpora as data
    from shrink.methods import build_method
    from shrink.models import load_model
    from shrink.planning.schedules import make_plan, needs_profiles, searches
    from shrink.run.pipeline import cost_model, plan_inputs
    from shrink.run.validation import apply_knob, shape_contexts

    cfg = make_cfg(*overrides)
    loaded = load_model(cfg.model, torch.float32, seed=cfg.seed)
    method = build_method(cfg.method)
    method.width_multiple = width_multiple(cfg)
    costs = cost_model(cfg, loaded.adapter)
    method.check_model(loaded.adapter)
    apply_knob(cfg, method, shape_contexts(loaded.adapter, costs), costs)  # as validation does
    inputs = plan_inputs(cfg, costs, method.prunes_heads)
    method.prepare(shape_contexts(loaded.adapter, costs), inputs)
    windows = data.calibration_windows(
        cfg.calib.corpus, loaded.tokenizer, cfg.calib.nsamples, cfg.calib.seq_len, cfg.seed, cfg.model.add_bos
    )
    cpu = torch.device("cpu")
    saliences = None
    if method.needs_gradients:
        saliences = taylor_saliences(loaded.adapter, windows, cfg.calib.batch_size, cpu)
    runner = Runner(
        loaded.adapter, windows, cfg.calib.batch_size, cpu, OnDevice(cpu), costs, method.new_stats, saliences,
        dense_pass=not method.rotates_stream, autocast=autocast_dtype(cfg.calib.autocast),
    )  # fmt: skip
    if needs_profiles(cfg.schedule.name):
        planner = runner.for_planning(cfg.calib.profile_share, autocast_dtype(cfg.calib.profile_autocast))
        inputs.curves = [
            c for ctx in planner.blocks(Propagate.dense, desc="profile") for c in method.profile(ctx)
        ]
    plan = make_plan(cfg.schedule.name, inputs)
    if searches(cfg.schedule.name):
        from shrink.run.search import searched_plan
        from shrink.run.store import ResidentStore

        plan, _ = searched_plan(cfg, ResidentStore(loaded, cpu), runner, method, inputs, method.needs_teacher)
    dense, rows, steps = costs.model(), [], []
    post = BlockSteps(cfg.quant, cfg.sparsity)
    removed = []
    for ctx in runner.blocks(Propagate(cfg.propagate), plan, method.needs_teacher or post.needs_teacher):
        rows += [{"block": ctx.index, **row} for row in method.compress_block(ctx).records]
        removed += [ctx.index] if ctx.removed else []
        step_rows = post.apply(ctx) if post.active and not ctx.removed else []
        steps += [{"block": ctx.index, **row} for row in step_rows]
        runner.advance(ctx)
    if removed:
        loaded.adapter.remove_blocks(removed)
    if method.embedding_basis() is not None:
        loaded.adapter.rotate_embeddings(method.embedding_basis())
    quant = OmegaConf.to_container(cfg.quant) if cfg.quant.name != "none" else None
    return Compressed(
        loaded, plan, rows, dense, costs.model(), costs.unit.value, cfg.model.head, steps, quant
    )


def fails(tmp_path, *overrides: str, match: str) -> None:
    """The run refuses the overrides with one ShrinkError matching `match`, leaving no run folder."""
    from shrink.errors import ShrinkError
    from shrink.run.pipeline import run

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "launch.log").touch()  # what Hydra leaves before calling the job
    with pytest.raises(ShrinkError, match=match):
        run(make_cfg(*overrides), run_dir=folder)
    assert not folder.exists(), "a failed validation must not leave a run folder"
