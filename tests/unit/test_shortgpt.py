"""`shortgpt`: Block Influence on explicit activations, an identity block goes first, whole blocks
leave a stock model with fewer layers that saves, reloads and resumes, and bad inputs fail first."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import shrink
import shrink.models
import shrink.run.pipeline  # noqa: F401  (bound to the real load_model before any test patches it)
from shrink.methods.shortgpt import LayerMetric, block_influence
from shrink.models import build_adapter

from ..conftest import (
    FAST,
    FAST_PPL,
    compress_in_memory,
    fails,
    interrupt_then_resume,
    logits,
    make_cfg,
    tiny_overrides,
)


def test_block_influence_is_the_papers_equation_on_explicit_activations():
    gen = torch.Generator().manual_seed(0)
    h_in = [torch.randn(2, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)]
    h_out = [h + 0.5 * torch.randn(h.shape, generator=gen) for h in h_in]
    pairs = zip(h_in, h_out, strict=True)
    cos = torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=-1).flatten() for a, b in pairs])
    bi = float(1 - cos.double().mean())
    assert block_influence(h_in, h_out, LayerMetric.bi) == pytest.approx(bi, rel=1e-6)
    angular = float((torch.arccos(cos.double().clamp(-1, 1)) / math.pi).mean())
    assert block_influence(h_in, h_out, LayerMetric.angular) == pytest.approx(angular, rel=1e-6)
    assert block_influence(h_in, h_in, LayerMetric.bi) == pytest.approx(0.0, abs=1e-12)


def _identity_blocks(*indices: int):
    """`load_model` whose blocks `indices` add nothing to the residual stream."""
    real = shrink.models.load_model

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        for index in indices:
            block = loaded.adapter.blocks()[index]
            with torch.no_grad():
                loaded.adapter.attention(block).linear("o").weight.zero_()
                block.get_submodule(loaded.adapter.site_paths["mlp_out"][0]).weight.zero_()
        return loaded

    return load


def test_a_run_selection_removes_the_consecutive_blocks_whose_input_is_closest_to_their_output(
    monkeypatch,
):
    """Gromov et al.: blocks 2 and 3 pass their input on, so the run 2–3 (distance 0) goes whole;
    a block's score is the distance of the best run it belongs to, on the windows' last tokens."""
    from shrink.data import corpora as data

    monkeypatch.setattr(shrink.models, "load_model", _identity_blocks(2, 3))
    # its scores from every calibration window (the planning pass's share is the whole set)
    six = ["model.tiny.num_hidden_layers=6", "method=shortgpt", "budget=0.67", "calib.profile_share=1.0"]
    gromov = ["method.selection=run", "method.metric=angular", "method.tokens=last"]
    done = compress_in_memory(*tiny_overrides("tiny-llama"), *six, *gromov)
    assert [r["removed"] for r in done.rows] == [False, False, True, True, False, False]
    assert done.rows[2]["score"] == done.rows[3]["score"] == pytest.approx(0.0, abs=1e-6)
    cfg = make_cfg(*tiny_overrides("tiny-llama"), *six)
    dense = _identity_blocks(2, 3)(cfg.model, torch.float32, seed=cfg.seed)
    calib = cfg.calib
    windows = data.calibration_windows(
        calib.corpus, dense.tokenizer, calib.nsamples, calib.seq_len, cfg.seed, cfg.model.add_bos
    )
    with torch.no_grad():
        states = dense.model(input_ids=windows, output_hidden_states=True).hidden_states
    first = block_influence([states[0][:, -1:]], [states[2][:, -1:]], LayerMetric.angular)
    assert done.rows[0]["score"] == pytest.approx(first, rel=1e-5)  # block 0 lies in the run 0–1 only


def _identity_block(index: int):
    """`load_model` whose block `index` adds nothing to the residual stream (o_proj and down_proj
    are zero): its output is its input, so its Block Influence is 0."""
    real = shrink.models.load_model

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        adapter = loaded.adapter
        block = adapter.blocks()[index]
        with torch.no_grad():
            adapter.attention(block).linear("o").weight.zero_()
            block.get_submodule(adapter.site_paths["mlp_out"][0]).weight.zero_()
        return loaded

    return load


@pytest.mark.parametrize("identity", [0, 1])
def test_a_block_that_is_the_identity_goes_first(monkeypatch, identity):
    monkeypatch.setattr(shrink.models, "load_model", _identity_block(identity))
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=shortgpt", "budget=0.6")
    assert [r["removed"] for r in done.rows] == [b == identity for b in range(2)]
    assert done.rows[identity]["score"] == pytest.approx(0.0, abs=1e-9)
    assert len(build_adapter(done.model).blocks()) == 1 and done.model.config.num_hidden_layers == 1
    assert done.achieved == pytest.approx(0.5)
    kept = build_adapter(done.model).blocks()[0]
    assert float(kept.get_submodule("mlp.down_proj").weight.abs().sum()) > 0, "the identity block stayed"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert"])
def test_keeping_every_block_reproduces_the_logits_and_removal_meets_the_budget(model):
    whole = compress_in_memory(*tiny_overrides(model), "method=shortgpt", "budget=1.0")
    dense = shrink.models.load_model(make_cfg(f"model={model}").model, torch.float32, seed=0).model
    ids = torch.randint(0, 255, (2, 16))
    assert torch.equal(logits(whole.model, ids), logits(dense, ids))
    pruned = compress_in_memory(*tiny_overrides(model), "method=shortgpt", "budget=0.7")
    assert pruned.achieved <= 0.7 and len(build_adapter(pruned.model).blocks()) == 1
    assert logits(pruned.model, ids).isfinite().all()


def test_the_checkpoint_is_stock_with_fewer_layers_and_generates(tmp_path):
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=shortgpt", "budget=0.5")
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and config["num_hidden_layers"] == 1
    stock = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 255, (2, 16))
    assert torch.equal(logits(stock, ids), logits(shrink.load(folder), ids))
    assert torch.equal(logits(stock, ids), logits(done.model, ids))
    out = stock.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)  # the KV cache's layer indices
    assert out.shape == (1, 7)


def test_a_run_interrupted_after_a_removed_block_resumes_without_it(monkeypatch, tmp_path):
    monkeypatch.setattr(shrink.models, "load_model", _identity_block(0))
    overrides = ["model=tiny-llama", *FAST, *FAST_PPL, "method=shortgpt", "budget=0.6"]
    metrics = interrupt_then_resume(monkeypatch, overrides, tmp_path / "run")
    assert metrics["budget_achieved"] == pytest.approx(0.5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "layers.jsonl").read_text().splitlines()]
    assert [r["removed"] for r in rows] == [True, False]
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and "auto_map" not in saved


def test_bad_inputs_fail_before_loading(tmp_path):
    tiny = tiny_overrides("tiny-llama")
    uniform = "removes whole blocks.*schedule=threshold"
    fails(tmp_path, *tiny, "method=shortgpt", "schedule=uniform", match=uniform)
    fails(tmp_path, *tiny, "method=shortgpt", "stream=true", match="stream=true and model.device_map")
    run = "selection=run removes one run of consecutive blocks.*schedule=threshold"
    fails(tmp_path, *tiny, "method=shortgpt", "method.selection=run", "schedule=greedy", match=run)
    with pytest.raises(Exception, match="metric"):
        make_cfg("method=shortgpt", "method.metric=cosine")


def test_the_block_count_knob_sets_the_budget_and_reports_it(tmp_path):
    """`method.blocks=1` on a 2-block model removes one block; the run's budget becomes 0.5 and is
    reported as requested beside the achieved one. With an explicit budget too, the launcher's
    checks refuse the pair."""
    from shrink.run.pipeline import run
    from shrink.run.validation import validate

    overrides = ["model=tiny-llama", *FAST, *FAST_PPL, "method=shortgpt", "method.blocks=1"]
    run(make_cfg(*overrides), run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["budget"] == pytest.approx(0.5) and metrics["budget_achieved"] == pytest.approx(0.5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "layers.jsonl").read_text().splitlines()]
    assert sum(r["removed"] for r in rows) == 1
    with pytest.raises(shrink.ShrinkError, match="method.blocks=1 sets how much shortgpt keeps"):
        validate(make_cfg(*overrides, "budget=0.7"), launch=([*overrides, "budget=0.7"], False))
    (tmp_path / "second").mkdir()
    too_many = r"method.blocks=2 must lie in \[1, 1\]"
    fails(tmp_path / "second", *overrides[:-1], "method.blocks=2", match=too_many)
