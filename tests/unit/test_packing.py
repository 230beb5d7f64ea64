"""Quantized checkpoints in compressed-tensors' pack-quantized layout: they reload
bit-exactly through shrink.load, load in stock transformers when the structure is the base
architecture's, are physically smaller, and widths that would split a group fail up front."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

import shrink
from shrink.quantization.packing import SCALE, ZERO, is_quantized

from ..conftest import FAST, compress_in_memory, fails, logits, tiny_overrides

GPTQ_32 = ["quant=gptq", "quant.bits=4", "quant.group_size=32"]
ASYM_CHANNEL = ["quant=rtn", "quant.bits=3", "quant.group_size=-1", "quant.sym=false", "quant.clip=true"]


def _tensor_names(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-opt", "tiny-bert"])
@pytest.mark.parametrize("quant", [GPTQ_32, ASYM_CHANNEL], ids=["gptq4-g32", "rtn3-asym-channel"])
def test_a_packed_checkpoint_reloads_bit_exactly(tmp_path, model, quant):
    done = compress_in_memory(*tiny_overrides(model), "method=id", "budget=0.7", *quant)
    folder = done.save(tmp_path / "model")
    names = _tensor_names(folder)
    packed = {n.removesuffix(".weight_packed") for n in names if n.endswith(".weight_packed")}
    quantized = {n for n, m in done.model.named_modules() if is_quantized(m)}
    assert packed == quantized and len(packed) >= 6 * 2  # every block linear of both blocks
    assert not any(f"{p}.weight" in names for p in packed)  # no dense copy beside the packed one
    assert all((f"{p}.{ZERO}" in names) == ("quant.sym=false" in quant) for p in packed)
    reloaded = shrink.load(folder)
    for name, module in reloaded.named_modules():
        if name in quantized:
            assert torch.equal(module.weight, done.model.get_submodule(name).weight), name
            assert torch.equal(getattr(module, SCALE), getattr(done.model.get_submodule(name), SCALE))
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(reloaded, ids), logits(done.model, ids))


def test_packed_weights_take_their_bits(tmp_path):
    """4-bit weights with a float32 scale per 32 of them: 5 bits where float32 took 32."""
    keep_all = [*tiny_overrides("tiny-llama"), "method=id", "budget=1.0", "schedule=uniform"]
    plain, four = compress_in_memory(*keep_all), compress_in_memory(*keep_all, *GPTQ_32)
    sizes = {}
    for name, done in (("plain", plain), ("four", four)):
        folder = done.save(tmp_path / name)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            sizes[name] = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118
    block = {k: v for k, v in sizes["four"].items() if ".layers." in k and "norm" not in k}
    dense_block = {k: v for k, v in sizes["plain"].items() if ".layers." in k and "norm" not in k}
    weights = sum(dense_block.values()) / 4  # float32 weights
    shapes = sum(v for k, v in block.items() if k.endswith("weight_shape"))
    assert (sum(block.values()) - shapes) * 8 / weights == pytest.approx(5.0)
    assert sum(sizes["four"].values()) < 0.6 * sum(sizes["plain"].values())  # embeddings stay float32


@pytest.mark.parametrize(
    ("model", "auto"),
    [
        ("tiny-llama", AutoModelForCausalLM),
        ("tiny-opt", AutoModelForCausalLM),
        ("tiny-bert", AutoModelForMaskedLM),
        ("tiny-bert-cls", AutoModelForSequenceClassification),
    ],
)
def test_a_quantized_run_of_the_base_structure_loads_in_stock_transformers(tmp_path, model, auto):
    done = compress_in_memory(*tiny_overrides(model), "method=id", "budget=1.0", "schedule=uniform", *GPTQ_32)
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    stock = auto.from_pretrained(folder)  # no shrink code involved
    assert not any(type(m).__module__.startswith("shrink") for m in stock.modules())
    ids = torch.randint(0, 255, (2, 32))
    with torch.no_grad():
        ours = done.model(input_ids=ids)
        theirs = stock(input_ids=ids)
    assert torch.equal(theirs.logits, ours.logits)


def test_a_plain_run_of_the_base_structure_loads_in_stock_transformers(tmp_path):
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=id", "budget=1.0", "schedule=uniform")
    folder = done.save(tmp_path / "model")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder), ids), logits(done.model, ids))


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=id", "budget=0.7", *GPTQ_32],  # per-block widths
        ["method=id", "budget=1.0", *ASYM_CHANNEL],  # packed zero points
        ["method=svd", "budget=0.7", "quant=rtn", "quant.group_size=-1"],  # packed factor pairs
        ["method=id", "budget=0.7", *GPTQ_32, "quant.lowrank=4"],  # corrected linears
    ],
    ids=["per-block", "zero-points", "pairs", "corrected"],
)
def test_packed_structures_load_with_trust_remote_code(tmp_path, overrides):
    """What transformers' compressed-tensors loader cannot take (structures it does not build, and
    packed zero points, which it sizes as unpacked) loads with the modeling file, which reads the
    packed layout itself: the same logits, bit for bit."""
    done = compress_in_memory(*tiny_overrides("tiny-llama"), *overrides)
    folder = done.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" in config and "quantization_config" not in config
    assert any(e["kind"] == "quantized" for e in config["shrink_edits"])
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ids = torch.randint(0, 255, (2, 32))
    assert torch.equal(logits(remote, ids), logits(done.model, ids))


def test_a_method_keeps_whole_groups(tmp_path):
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=id", "budget=0.6", *GPTQ_32)
    for name, module in done.model.named_modules():
        if is_quantized(module):
            assert module.in_features % 32 == 0, (name, module.in_features)
    assert done.achieved <= 0.6


def test_a_group_size_that_splits_a_width_fails_before_loading(tmp_path):
    # tiny-llama's FFN is 160 wide: groups of 64 would leave half a group
    fails(
        tmp_path, "model=tiny-llama", *FAST, "eval=none", "quant=gptq", "quant.group_size=64",
        match=r"group_size=64 needs input widths divisible by 64 .* has 160 inputs; valid here: -1, 32$",
    )  # fmt: skip


WIDER = ["model.tiny.hidden_size=128"]  # ranks in whole groups of 32 need linears wider than 64


@pytest.mark.parametrize(
    "method",
    [["method=id"], ["method=svd"], ["method=rom"], ["method=svdllm"], ["method=distill", "method.steps=2"]],
    ids=lambda m: m[0],
)
def test_every_method_meets_a_bytes_budget_as_stored(tmp_path, method):
    """budget_unit=bytes: 4-bit weights with a float32 scale per 32 are 5/32 of float32, so a
    budget of 0.12 also prunes; the checkpoint's block tensors take what the run reports."""
    done = compress_in_memory(
        *tiny_overrides("tiny-llama"), *WIDER, *method, "budget=0.12", "budget_unit=bytes", *GPTQ_32
    )
    assert done.achieved <= 0.12
    assert done.kept.params < done.dense.params  # 5/32 > 0.12: the method had to remove weights
    folder = done.save(tmp_path / "model")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()  # noqa: SIM118
            if ".layers." in k and "norm" not in k and not k.endswith("weight_shape")
        )
    assert stored == pytest.approx(done.kept.bytes)
    assert done.kept.bytes == pytest.approx(done.achieved * done.dense.bytes)


def test_bytes_without_quantization_is_the_dtype_size_of_params():
    done = compress_in_memory(*tiny_overrides("tiny-llama"), "method=id", "budget=0.5", "budget_unit=bytes")
    assert done.achieved <= 0.5 and done.kept.bytes == 4 * done.kept.params


def test_bytes_with_a_per_row_scale_fails_before_loading(tmp_path):
    fails(
        tmp_path, "model=tiny-llama", *FAST, "eval=none", "budget_unit=bytes", "quant=rtn",
        "quant.group_size=-1",
        match=r"budget_unit=bytes .* quant.group_size=-1 .*: use quant.group_size 32, 64 or 128$",
    )  # fmt: skip
