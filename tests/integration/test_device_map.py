"""model.device_map: a model spread by accelerate over devices (here the CPU and disk offload)
is compressed where it lies, and gives the same run as a model loaded whole."""

from __future__ import annotations

import json

import pytest
import torch

import shrink
from shrink.errors import ShrinkError
from shrink.models.device_map import Mapped
from shrink.run.pipeline import run

from ..conftest import FAST, FAST_PPL, interrupt_then_resume, local_model, make_cfg, sharded_copy

# Llama: a dict map with one block, the final norm and the (tied) head offloaded to disk;
# OPT: accelerate's own map under a memory cap too small for anything but the embeddings, with a
# profiling pass (greedy) that must leave the dense blocks offloaded as it found them.
LLAMA_MAP = (
    "model.device_map={model.embed_tokens:cpu,model.rotary_emb:cpu,model.layers.0:cpu,"
    "model.layers.1:disk,model.norm:disk,lm_head:disk}"
)
CASES = {
    "llama-id-dict": ("tiny-llama", ["method=id", "schedule=uniform"], [LLAMA_MAP], {"cpu": 1, "disk": 1}),
    "llama-slicegpt-dict": (
        "tiny-llama",
        ["method=slicegpt", "budget=0.7"],
        [LLAMA_MAP],
        {"cpu": 1, "disk": 1},
    ),
    "opt-svdllm-greedy-auto": (
        "tiny-opt",
        ["method=svdllm", "schedule=greedy"],
        ["model.device_map=auto", "model.max_memory={cpu:60000}"],
        {"disk": 2},
    ),
}


def _overrides(tmp_path, model_name: str) -> list[str]:
    source = sharded_copy(tmp_path, model_name)
    return [*local_model(model_name, source), *FAST, *FAST_PPL]


def _metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _same_weights(a_folder, b_folder) -> bool:
    a, b = (shrink.load(f / "model").state_dict() for f in (a_folder, b_folder))
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mapped_model_gives_the_loaded_run(tmp_path, monkeypatch, case):
    model_name, method, mapping, counts = CASES[case]
    overrides = [*_overrides(tmp_path, model_name), *method, "eval.cache_dense=false"]
    run(make_cfg(*overrides), run_dir=tmp_path / "loaded")

    real_leave, left = Mapped.leave, []

    def leave_and_look(self, index, block):
        real_leave(self, index, block)
        left.append((index, self.homes[index], any(p.is_meta for p in block.parameters())))

    monkeypatch.setattr(Mapped, "leave", leave_and_look)
    run(make_cfg(*overrides, *mapping), run_dir=tmp_path / "mapped")

    loaded, mapped = _metrics(tmp_path / "loaded"), _metrics(tmp_path / "mapped")
    assert mapped["device_map"] == counts and loaded["device_map"] is None
    for key in ("budget_achieved", "params_dense", "params_compressed", "eval"):
        assert mapped[key] == loaded[key], key
    assert _same_weights(tmp_path / "loaded", tmp_path / "mapped")
    assert not (tmp_path / "mapped" / "offload").exists()
    # a disk block is read in for its turn; a compressed one stays in memory (it is new), while
    # an unchanged one (the profiling pass) goes back to disk
    blocks = sum(counts.values())
    profiled, compressed = left[:-blocks], left[-blocks:]
    assert len(profiled) == (blocks if "schedule=greedy" in method else 0)
    assert all(meta == (home == "disk") for _, home, meta in profiled)
    assert [i for i, *_ in compressed] == list(range(blocks)) and not any(m for *_, m in compressed)


def test_a_mapped_run_resumes_after_an_interruption(tmp_path, monkeypatch):
    """A mapped run killed after block 0 resumes to the weights of an uninterrupted loaded run;
    its dense perplexity comes from the cache the loaded run filled (placement is not in the key)."""
    overrides = [*_overrides(tmp_path, "tiny-llama"), "method=svdllm"]
    run(make_cfg(*overrides), run_dir=tmp_path / "whole")

    resumed = interrupt_then_resume(monkeypatch, [*overrides, LLAMA_MAP], tmp_path / "resumed")
    assert resumed["device_map"] == {"cpu": 1, "disk": 1} and resumed["eval"]["dense_cached"] == ["ppl.wiki"]
    assert resumed["eval"]["ppl"] == _metrics(tmp_path / "whole")["eval"]["ppl"]
    assert _same_weights(tmp_path / "whole", tmp_path / "resumed")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.device_map=everywhere"], "'everywhere' is not a strategy; valid: auto, balanced"),
        (["model.device_map={model.layers.0:cuda:7}"], "'cuda:7' is not a device here; valid: cpu, disk"),
        (["model.max_memory={cpu:1GiB}"], "max_memory applies with model.device_map only"),
        (
            ["model.device_map=auto", "stream=true", "eval=ppl"],
            "device_map and stream=true exclude each other",
        ),
        (
            ["model.device_map={model.layers.0:cpu,model.layers.1.mlp:disk,model.layers.1.self_attn:cpu}"],
            r"puts block 1 \(model.layers.1\) on \['cpu', 'disk'\]; map whole blocks",
        ),
    ],
)
def test_bad_device_maps_fail_before_loading(tmp_path, monkeypatch, overrides, message):
    source = tmp_path / "tiny"
    from shrink.models import load_model

    tiny = load_model(make_cfg("model=tiny-llama").model, torch.float32)
    tiny.model.save_pretrained(source)
    monkeypatch.setattr("shrink.run.store.load_model", lambda *a, **k: pytest.fail("loaded"))
    cfg = make_cfg(*local_model("tiny-llama", source), "logger=none", *overrides)
    with pytest.raises(ShrinkError, match=message):
        run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_tiny_random_model_cannot_be_mapped(tmp_path):
    with pytest.raises(ShrinkError, match="tiny random model or a model in memory has none: save it"):
        run(make_cfg("model=tiny-llama", "model.device_map=auto", "logger=none"), run_dir=tmp_path / "run")
