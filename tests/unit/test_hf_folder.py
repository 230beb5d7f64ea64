"""Checkpoints that stock transformers loads: blocks thinned alike are the
family's own architecture under a smaller config, written as config.json; anything else is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

import shrink
from shrink.models import build_adapter, check_source

from ..conftest import compress_in_memory, logits, make_cfg, tiny_overrides

UNIFORM = ["method=id", "schedule=uniform", "budget=0.7"]
WHOLE_HEADS = ["method.attention=heads"]
FFN_ONLY = ["method.heads=false"]

CASES = {  # model, overrides, auto class, what the config changes
    "llama-heads": (
        "tiny-llama",
        WHOLE_HEADS,
        AutoModelForCausalLM,
        {"num_attention_heads", "intermediate_size"},
    ),
    "qwen2-heads": (
        "tiny-qwen2",
        WHOLE_HEADS,
        AutoModelForCausalLM,
        {"num_attention_heads", "intermediate_size"},
    ),
    "opt-ffn": ("tiny-opt", FFN_ONLY, AutoModelForCausalLM, {"ffn_dim"}),
    "bert-ffn": ("tiny-bert", FFN_ONLY, AutoModelForMaskedLM, {"intermediate_size"}),
    "distilbert-ffn": ("tiny-distilbert", FFN_ONLY, AutoModelForMaskedLM, {"hidden_dim"}),
}


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_thinned_alike_load_in_stock_transformers(tmp_path, case):
    model_name, extra, auto, changed = CASES[case]
    done = compress_in_memory(*tiny_overrides(model_name), *UNIFORM, *extra)
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    dense = done.model.config.to_dict()
    assert {k for k in changed if config[k] != dense[k]} == changed, "the blocks were thinned"
    stock = auto.from_pretrained(folder)
    assert not any(type(m).__module__.startswith("shrink") for m in stock.modules())
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(_outputs(stock, ids), _outputs(shrink.load(folder), ids))
    assert torch.equal(_outputs(stock, ids), logits(done.model, ids))


def test_a_quantized_uniform_model_loads_packed_in_stock_transformers(tmp_path):
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), *UNIFORM, *WHOLE_HEADS, "quant=gptq", "quant.group_size=32"
    )
    folder = done.save(tmp_path / "model")
    assert (
        json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    )
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(_outputs(AutoModelForCausalLM.from_pretrained(folder), ids), logits(done.model, ids))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny-opt", *UNIFORM, *WHOLE_HEADS],  # OPT's head size is hidden / heads
        ["model=tiny-llama", "method=id", "budget=0.7"],  # greedy-residual: widths per block
        # a bias Qwen2's down_proj has not, and no config key gives it one (Llama's mlp_bias
        # does: tests/test_scored.py)
        ["model=tiny-qwen2", *UNIFORM, "method.bias=true"],
        ["model=tiny-llama", "method=svd", "budget=0.7"],  # factor pairs
    ],
    ids=["opt-heads", "per-block", "added-bias", "pairs"],
)
def test_structures_the_family_cannot_build_need_the_modeling_file(tmp_path, monkeypatch, overrides):
    """Such a folder says why it needs trust_remote_code (config.json's first key) and has a model
    type of its own, so that transformers without remote code refuses it, asking for it, instead of
    building the base class on weights that do not fit (or, for factor pairs, re-initialising)."""
    done = compress_in_memory(*tiny_overrides(overrides[0].removeprefix("model=")), *overrides[1:])
    assert build_adapter(done.model).stock_config() is None or "bias" in overrides[-1]
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" in config and config["model_type"].startswith("shrink_")
    assert next(iter(config)) == "shrink_note" and "trust_remote_code=True" in config["shrink_note"]
    monkeypatch.setattr("builtins.input", lambda *a: (_ for _ in ()).throw(EOFError))  # no one to answer
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert shrink.load_tokenizer(folder)("abc").input_ids == done.loaded.tokenizer("abc").input_ids
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # as the model card says
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(shrink.load(folder), ids), logits(done.model, ids))
    with pytest.raises(shrink.ShrinkError, match="is a shrink checkpoint .* start from its base model"):
        check_source(make_cfg("model=local", f"model.path={folder}").model)


@pytest.mark.parametrize("structure", ["stock", "remote"])
def test_the_lm_eval_cli_evaluates_a_run_folder_offline(tmp_path, monkeypatch, structure):
    """`lm_eval --model hf --model_args pretrained=<run>/model[,trust_remote_code=True]` with
    shrink's offline task files."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from shrink.evaluation.zeroshot import write_offline_tasks

    overrides = [*UNIFORM, *WHOLE_HEADS] if structure == "stock" else ["method=svd", "budget=0.7"]
    done = compress_in_memory(*tiny_overrides("tiny-llama"), *overrides)
    folder = done.save(tmp_path / "model")
    remote = ",trust_remote_code=True" if structure == "remote" else ""
    assert ("auto_map" in json.loads((folder / "config.json").read_text())) == bool(remote)
    (task,) = write_offline_tasks(tmp_path / "tasks", ["piqa"])
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder}{remote}",
        "--tasks", task, "--include_path", str(tmp_path / "tasks"), "--limit", "2", "--device", "cpu",
        "--batch_size", "1", "--output_path", str(tmp_path / "results"),
    ]  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["lm_eval", *cmd[3:]])
    cli_evaluate()  # lm-eval's own command line, in this process (its imports are paid once)
    (result,) = (tmp_path / "results").rglob("results_*.json")
    scores = json.loads(result.read_text())["results"][task]
    assert 0.0 <= scores["acc,none"] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "stock"),
    [
        (["model=tiny-llama", *UNIFORM, *WHOLE_HEADS, "quant=gptq", "quant.group_size=32"], True),
        (["model=tiny-llama", "method=svd", "budget=0.7"], False),
    ],
    ids=["stock-quantized", "pairs"],
)
def test_the_model_card_has_the_metadata_widths_and_scores(run_job, overrides, stock):
    from ..conftest import FAST, FAST_PPL

    metrics, folder = run_job(*overrides, *FAST, *FAST_PPL)
    card = (folder / "model" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers"
    assert ("custom_code" in header["tags"]) != stock
    assert header["pipeline_tag"] == "text-generation" and "shrink" in header["tags"]
    assert ("4-bit" in header["tags"]) == stock
    ppl = metrics["eval"]["ppl"]["wiki"]
    assert f"| wiki | {ppl['dense']:.2f} | {ppl['compressed']:.2f} |" in card
    assert f"{metrics['params_compressed']:,}" in card and f"{metrics['budget_achieved']:.4f}" in card
    assert card.count("\n| 0 | ") == 1 and card.count("\n| 1 | ") == 1  # a row per block
    assert "AutoModelForCausalLM.from_pretrained" in card and ("trust_remote_code=True" in card) != stock
    tokenizer_line = next(line for line in card.splitlines() if "AutoTokenizer.from_pretrained" in line)
    assert ("trust_remote_code=True" in tokenizer_line) != stock
    below_title = card.split("\n# ", 1)[1].splitlines()[2]
    assert below_title.startswith("**Load with trust_remote_code=True") != stock


METHODS = {
    "id": ["method=id", "budget=0.6"],
    "id-qk": ["method=id", "budget=0.6", "method.qk_dims=true"],
    "svd": ["method=svd", "budget=0.7"],
    "rom": ["method=rom", "budget=0.7"],
    "svdllm": ["method=svdllm", "budget=0.7"],
    "distill": ["method=distill", "method.steps=2", "budget=0.7"],
    "flap": ["method=flap", "budget=0.7"],
    # block 0 dense, block 1 pruned: a structure only the modeling file builds
    "llm-pruner": ["method=llm-pruner", "schedule.dense_first=1", "schedule.dense_last=0", "budget=0.8"],
    "slicegpt": ["method=slicegpt", "budget=0.8"],  # shortcut matrices, weightless norms
}
AUTO = {
    "tiny-llama": AutoModelForCausalLM,
    "tiny-opt": AutoModelForCausalLM,
    "tiny-bert": AutoModelForMaskedLM,
    "tiny-distilbert": AutoModelForMaskedLM,
}


@pytest.mark.parametrize("model_name", sorted(AUTO))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_any_structure_loads_with_trust_remote_code(tmp_path, model_name, method):
    if method == "id-qk" and model_name != "tiny-llama":
        pytest.skip("q/k thinning is covered on one family here (tests/test_id_qk.py has the rest)")
    if method == "llm-pruner" and AUTO[model_name] is AutoModelForMaskedLM:
        pytest.skip("llm-pruner scores by the next-token loss, which encoders lack")
    if method == "slicegpt" and AUTO[model_name] is AutoModelForMaskedLM:
        pytest.skip("slicegpt rotates pre-norm streams; these encoders are post-norm")
    done = compress_in_memory(*tiny_overrides(model_name), *METHODS[method])
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] and config["shrink_edits"] and (folder / "modeling_shrink.py").is_file()
    remote = AUTO[model_name].from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__name__ == f"Shrink{type(done.model).__name__}"
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(_outputs(remote, ids), _outputs(shrink.load(folder), ids))


@pytest.mark.parametrize("name", ["modeling_shrink.py", "modeling_shrink_attention.py"])
def test_the_modeling_files_import_nothing_from_shrink(name):
    import ast

    from shrink import modeling_shrink

    assert name in modeling_shrink.MODELING_FILES
    tree = ast.parse(Path(modeling_shrink.__file__).with_name(name).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0
    }
    assert imported <= {"__future__", "typing", "sys", "torch", "transformers"}, imported
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    assert {f"{module}.py" for module in relative} <= set(modeling_shrink.MODELING_FILES)  # carried beside
