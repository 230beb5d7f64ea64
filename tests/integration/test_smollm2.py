"""The default `python launch.py` path on the real offline SmolLM2-135M (small calibration set)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import shrink
import shrink.run.pipeline
from shrink.data import corpora as data
from shrink.evaluation import perplexity

from ..conftest import ROOT

# one worker runs all three: the mapped run reads the dense scores the default launch cached
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("smollm2")]


def test_default_launch_on_smollm2(tmp_path):
    folder = tmp_path / "run"
    cmd = [
        sys.executable,
        "launch.py",
        "logger=jsonl",
        "calib.nsamples=4",
        "calib.seq_len=512",
        "eval.ppl.max_tokens=2048",
        # the default suite is `quick`; two of its tasks and 20 items keep the test short
        "eval.zeroshot.tasks=[piqa,arc_easy]",
        "eval.zeroshot.limit=20",
        f"hydra.run.dir={folder}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shrink: smollm2-135m  method=id" in out.stdout and "ppl wiki" in out.stdout
    assert "zero-shot mean" in out.stdout

    m = json.loads((folder / "metrics.json").read_text())
    assert m["model"] == "smollm2-135m" and m["params_dense"] == 134_515_008
    assert m["budget_achieved"] <= m["budget"] == 0.5
    assert sorted(m["eval"]["zeroshot"]) == ["arc_easy", "mean", "piqa"]
    assert all(0 <= row["compressed"] <= 1 for row in m["eval"]["zeroshot"].values() if "n" in row)
    ppl = m["eval"]["ppl"]["wiki"]
    assert 10 < ppl["dense"] < 40, ppl  # held-out Wikipedia, 1024-token windows
    assert math.isfinite(ppl["compressed"]) and ppl["compressed"] > ppl["dense"]
    # id at half the block weights from 2048 calibration tokens stays a language model: 5.2x dense
    # on these 2046 test tokens (truncated SVD at this budget is above 1e8)
    assert ppl["compressed"] < 15 * ppl["dense"], ppl
    for name in ("config.yaml", "layers.jsonl", "spectra.npz", "plan.jsonl", "model/manifest.json"):
        assert (folder / name).is_file(), name

    # the saved checkpoint reloads to the very model that was evaluated
    model = shrink.load(folder / "model")
    tokenizer = shrink.load_tokenizer(folder / "model")
    assert sum(p.numel() for p in model.parameters()) == m["params_compressed"]
    windows = data.test_windows("wiki", tokenizer, ppl["seq_len"], 2048)
    again = perplexity(model, windows, 1, torch.device("cpu"))["ppl"]
    assert again == pytest.approx(ppl["compressed"], rel=1e-5)


def test_quick_suite_on_a_mapped_smollm2(tmp_path):
    """`eval=quick` (fewer items) on the real model, spread by accelerate over the CPU and disk
    (`model.device_map`): zero-shot scores in a sane range, dense near the reference figures of
    shared/OFFLINE.md (from the dense cache the default launch filled), a mild compression keeps
    them above chance when lm-eval runs the mapped compressed model through accelerate's hooks."""
    from shrink.run.pipeline import run

    from ..conftest import make_cfg

    overrides = [
        "eval=quick", "eval.zeroshot.tasks=[piqa,arc_easy]", "eval.zeroshot.limit=20",
        "eval.ppl=null",  # a mapped model's perplexity: tests/integration/test_device_map.py
        "logger=none", "calib.nsamples=4", "calib.seq_len=256", "budget=0.9", "save_model=false",
        "method=wanda-sp", "model.device_map=auto", "model.max_memory={cpu:520MB}",  # a few blocks on disk
    ]  # fmt: skip
    run(make_cfg(*overrides), run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["device_map"]["disk"] > 0 and sum(metrics["device_map"].values()) == 30
    zs = metrics["eval"]["zeroshot"]
    chance = {"piqa": 0.5, "arc_easy": 0.25}
    for task, floor in chance.items():
        row = zs[task]
        assert row["n"] == 20 and row["dense_stderr"] > 0
        assert floor + 0.05 < row["dense"] < 0.85, (task, row)  # reference: 0.64, 0.50
        assert floor - 0.1 < row["compressed"] <= 1.0, (task, row)
    assert 0.4 < zs["mean"]["dense"] < 0.8


def test_streamed_run_on_smollm2(tmp_path):
    """stream=true on the real model: perplexities equal the loaded models', the sharded
    checkpoint reloads to the model that was evaluated."""
    from shrink.models import load_model

    from ..conftest import make_cfg

    folder = tmp_path / "run"
    overrides = ["stream=true", "eval=ppl", "eval.ppl.max_tokens=1024", "eval.cache_dense=false"]
    overrides += ["calib.nsamples=4", "calib.seq_len=256", "budget=0.8", "logger=none", "schedule=uniform"]
    # the fixed ridge: cross-validation is half of this run's time, and is checked streamed on the
    # tiny models (tests/integration/test_stream.py)
    overrides += ["method.ridge_cv=0"]
    shrink.run.pipeline.run(make_cfg(*overrides), run_dir=folder)
    m = json.loads((folder / "metrics.json").read_text())
    ppl = m["eval"]["ppl"]["wiki"]
    assert m["stream"] and (folder / "model" / "model.safetensors.index.json").is_file()
    assert len(list((folder / "model").glob("model-*.safetensors"))) == 31

    cfg = make_cfg(*overrides)
    dense = load_model(cfg.model, torch.float32)
    windows = data.test_windows("wiki", dense.tokenizer, ppl["seq_len"], 1024)
    assert perplexity(dense.model, windows, 1, torch.device("cpu"))["ppl"] == pytest.approx(
        ppl["dense"], rel=1e-6
    )
    model = shrink.load(folder / "model")
    assert sum(p.numel() for p in model.parameters()) == m["params_compressed"]
    again = perplexity(model, windows, 1, torch.device("cpu"))["ppl"]
    assert again == pytest.approx(ppl["compressed"], rel=1e-6)


def test_a_uniform_quantized_smollm2_loads_in_stock_transformers(tmp_path):
    """0.8 thinned alike in every block, then 4-bit weights: the run's folder is a plain
    transformers checkpoint (smaller config, packed weights) with the run's perplexity. Structured
    Wanda makes the uniform widths in a fraction of `id`'s time (id's uniform stock checkpoints are
    tested on every family in tests/unit/test_hf_folder.py); round-to-nearest stores the same
    packed layout as GPTQ (whose solver the unit tests check on every family)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shrink.run.pipeline import run

    from ..conftest import make_cfg

    overrides = [
        "method=wanda-sp", "budget=0.8", "quant=rtn",
        "eval=ppl", "eval.ppl.max_tokens=2048", "logger=none", "calib.nsamples=4", "calib.seq_len=256",
    ]  # fmt: skip
    run(make_cfg(*overrides), run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    folder = tmp_path / "run" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] < 1536 and config["quantization_config"]["format"] == "pack-quantized"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ppl = metrics["eval"]["ppl"]["wiki"]
    windows = data.test_windows("wiki", tokenizer, ppl["seq_len"], 2048)
    assert perplexity(model, windows, 1, torch.device("cpu"))["ppl"] == pytest.approx(
        ppl["compressed"], rel=1e-5
    )
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")


ATTENTION_MODES = [["method.attention=auto"], ["method.attention=heads"], ["method.attention=dims"],
                   ["method.attention=both"], ["method.attention=both", "method.qk_dims=true"]]  # fmt: skip
SCHEDULES = [["schedule=greedy-residual"], ["schedule=greedy"],
             ["schedule=greedy", "schedule.error=downstream"], ["schedule=energy"], ["schedule=uniform"],
             ["schedule=last_k", "schedule.k=2"], ["schedule=first_k", "schedule.k=2"]]  # fmt: skip


def test_budget_one_keeps_every_unit_of_the_real_model():
    """Budget 1 is the identity on SmolLM2's own shapes and weights (9 query / 3 KV heads of 64)
    under every schedule and attention mode, planned from 128 calibration tokens: fewer than the
    attention width, so the statistics are rank-deficient and cheaper options of zero error
    abound. Then the default run at budget 1 gives the dense logits exactly. Four of the thirty
    blocks keep the test short."""
    from shrink.blocks.placement import OnDevice
    from shrink.blocks.runner import Runner
    from shrink.config import Propagate
    from shrink.methods import build_method
    from shrink.models import build_adapter, load_model
    from shrink.planning.inputs import cost_model, plan_inputs
    from shrink.planning.schedules import make_plan, needs_profiles

    from ..conftest import make_cfg

    calib = ["budget=1.0", "calib.nsamples=2", "calib.seq_len=64", "calib.batch_size=2", "device=cpu"]
    loaded = load_model(make_cfg(*calib).model, torch.float32)
    loaded.model.model.layers = loaded.model.model.layers[:4]
    loaded.model.config.num_hidden_layers = 4
    adapter, cpu = build_adapter(loaded.model), torch.device("cpu")
    ids = data.test_windows("wiki", loaded.tokenizer, 64, 128)
    with torch.no_grad():
        dense = loaded.model(input_ids=ids).logits

    def runner(cfg, method):
        windows = data.calibration_windows("wiki", loaded.tokenizer, 2, 64, 0)
        return Runner(adapter, windows, 2, cpu, OnDevice(cpu), cost_model(cfg, adapter), method.new_stats)

    for mode in ATTENTION_MODES:
        method = build_method(make_cfg(*calib, *mode).method)
        curves = [
            c
            for ctx in runner(make_cfg(*calib, *mode), method).blocks(Propagate.dense)
            for c in method.profile(ctx)
        ]
        for schedule in SCHEDULES:
            cfg = make_cfg(*calib, *mode, *schedule)
            inputs = plan_inputs(cfg, cost_model(cfg, adapter), method.prunes_heads)
            inputs.curves = curves if needs_profiles(cfg.schedule.name) else None
            plan = make_plan(cfg.schedule.name, inputs)
            cut = {(b, s): f for b, sites in plan.targets.items() for s, f in sites.items() if f != 1.0}
            assert not cut, (mode, schedule, cut)

    cfg = make_cfg(*calib)  # the default: id, greedy-residual, attention=auto
    method = build_method(cfg.method)
    walk = runner(cfg, method)
    inputs = plan_inputs(cfg, cost_model(cfg, adapter), method.prunes_heads)
    inputs.curves = [c for ctx in walk.blocks(Propagate.dense) for c in method.profile(ctx)]
    for ctx in walk.blocks(Propagate.compressed, make_plan(cfg.schedule.name, inputs)):
        method.compress_block(ctx)
        walk.advance(ctx)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, dense)
