"""stream=true: blocks read one at a time from safetensors shards give the same run as a loaded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import shrink
import shrink.linalg.moments as moments
from shrink.blocks.placement import Streamed
from shrink.errors import ShrinkError
from shrink.run.pipeline import run

from ..conftest import FAST, FAST_PPL, interrupt_then_resume, local_model, logits, make_cfg, sharded_copy

# (tiny model, method, eval): Llama with dense propagation, OPT with a profiling pass, an encoder
CASES = {
    "llama-id-dense": ("tiny-llama", ["method=id", "propagate=dense"], FAST_PPL),
    # the affine fold against the dense model's activations, its moments set aside on disk
    "llama-id-target": ("tiny-llama", ["method=id", "method.target=dense", "method.bias=true"], FAST_PPL),
    "opt-svdllm-greedy": ("tiny-opt", ["method=svdllm", "schedule=greedy"], FAST_PPL),
    "bert-distill": ("tiny-bert", ["method=distill", "method.steps=4"], ["eval=none"]),
    # a rotated, sliced residual stream: new modules in every block, a basis carried across blocks,
    # the embeddings rotated and the head untied at the end
    "llama-slicegpt": ("tiny-llama", ["method=slicegpt", "budget=0.7", "method.embeddings=slice"], FAST_PPL),
    "llama-id-gptq": (
        "tiny-llama",
        ["method=id", "budget=0.7", "quant=gptq", "quant.group_size=32", "quant.lowrank=4"],
        FAST_PPL,
    ),
}


def weights(folder):
    state = {}
    for file in sorted((folder / "model").glob("*.safetensors")):
        state |= load_file(str(file))
    return state


@pytest.mark.parametrize("case", sorted(CASES))
def test_stream_equals_a_loaded_run_and_holds_one_block(tmp_path, monkeypatch, case):
    model_name, method, evaluation = CASES[case]
    source = sharded_copy(tmp_path, model_name)
    overrides = [
        *local_model(model_name, source),
        *FAST,
        *method,
        *evaluation,
        "eval.cache_dense=false",  # the streamed run computes its dense perplexity block by block
    ]
    run(make_cfg(*overrides), run_dir=tmp_path / "loaded")

    real_enter, entered = Streamed.enter, []

    def enter_alone(self, index, block):
        blocks = shrink.models.build_adapter(block_owner[0]).blocks()
        real = [i for i, b in enumerate(blocks) if not next(b.parameters()).is_meta]
        assert real == [], f"blocks {real} are in memory when block {index} comes in"
        entered.append(index)
        real_enter(self, index, block)

    from shrink.models import streaming

    real_load, block_owner = streaming.load_streamed, []

    def load_and_remember(*args, **kwargs):
        loaded, fetch = real_load(*args, **kwargs)
        block_owner.append(loaded.model)
        return loaded, fetch

    monkeypatch.setattr(Streamed, "enter", enter_alone)
    monkeypatch.setattr("shrink.run.store.load_streamed", load_and_remember)
    # every site's statistics are set aside on disk while the method needs the memory, as a wide
    # model's are; the run must not change by it
    set_aside: list = []
    real_written = moments._written
    monkeypatch.setattr(moments, "_SET_ASIDE_ENTRIES", 0)
    monkeypatch.setattr(moments, "_written", lambda at, m: set_aside.append(at) or real_written(at, m))
    run(make_cfg(*overrides, "stream=true"), run_dir=tmp_path / "streamed")
    assert entered and set(entered) == {0, 1}
    assert bool(set_aside) == ("method=id" in method)

    loaded, streamed = (
        json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("loaded", "streamed")
    )
    assert streamed["stream"] and not loaded["stream"]
    for key in ("budget_achieved", "params_dense", "params_compressed", "eval"):
        assert streamed[key] == loaded[key], key
    assert (tmp_path / "streamed" / "model" / "model.safetensors.index.json").exists()
    # the same weights (a tied embedding may be stored under either name), the same outputs
    a, b = (shrink.load(tmp_path / f / "model") for f in ("loaded", "streamed"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)
    ids = torch.randint(0, 250, (2, 32))
    with torch.no_grad():
        assert torch.equal(logits(a, ids), logits(b, ids))
    assert not (tmp_path / "streamed" / "progress").exists()


def test_stream_resumes_after_an_interruption(tmp_path, monkeypatch):
    source = sharded_copy(tmp_path, "tiny-llama")
    overrides = [*local_model("tiny-llama", source), *FAST, *FAST_PPL]
    overrides += ["stream=true", "method=svdllm"]
    run(make_cfg(*overrides), run_dir=tmp_path / "whole")

    metrics = interrupt_then_resume(monkeypatch, overrides, tmp_path / "resumed")
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["eval"]["ppl"] == whole["eval"]["ppl"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny-llama"], "tiny random model with none.*valid sources: packaged, local, hub, gguf"),
        (["eval=quick"], "evaluates perplexity only.*also runs zeroshot.*use eval=ppl or eval=none"),
        (["eval=ppl", "block_checkpoints=false"], "set block_checkpoints=true"),
    ],
)
def test_stream_bad_inputs_fail_before_loading(tmp_path, overrides, message):
    with pytest.raises(ShrinkError, match=message):
        run(make_cfg("stream=true", *overrides, "logger=none"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_peak_rss_is_the_runs_own():
    """A run reports its own peak, not the process's (sweeps run many jobs in one process). Checked
    in a fresh interpreter: in this long-lived one the C heap may serve 200 MB from memory it
    already holds, so the allocation would not raise the mark it is meant to raise."""
    script = (
        "import sys, torch\n"
        "from shrink.hardware import memory as rss\n"
        "big = torch.ones(50_000_000)  # 200 MB\n"
        "high = rss.peak_mb()\n"
        "del big\n"
        "if not rss.reset_peak():\n"
        "    sys.exit(3)\n"
        "print(high, rss.peak_mb())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if out.returncode == 3:
        pytest.skip("this OS cannot reset the peak RSS")
    assert out.returncode == 0, out.stderr[-2000:]
    high, after = map(float, out.stdout.split())
    assert after < high - 150
