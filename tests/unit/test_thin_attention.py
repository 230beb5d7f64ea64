"""Attention at the kept widths: a block whose values or queries/keys are thinned computes A·V and
QKᵀ at those widths and caches thin keys and values, with the logits of the zero-padded layers
(prefill and cached decode; grouped-query and multi-head; Llama-like rotary families and OPT),
through save → load, and priced at those widths."""

from __future__ import annotations

import copy

import pytest
import torch

from shrink.checkpoints.save_load import load, save, structural_edits
from shrink.modeling_shrink import padded_attention
from shrink.modeling_shrink_attention import is_thin, make_thin, rotary_pairs
from shrink.planning.cost import CostModel

from ..conftest import compress_in_memory, tiny_overrides

THIN = ["method=id", "method.dims_step=4", "method.attention=dims", "budget=0.5", "schedule=uniform"]
GEMMA3 = [
    "model.path=Gemma3TextConfig", "+model.tiny.head_dim=16", "+model.tiny.sliding_window=8",
    "+model.tiny.query_pre_attn_scalar=16",
]  # fmt: skip
MISTRAL = ["model.path=MistralConfig", "+model.tiny.sliding_window=8"]
CASES = {
    "llama-gqa-qk": ("tiny-llama", ["method.qk_dims=true"]),
    "llama-gqa-values": ("tiny-llama", []),
    "opt-mha-qk": ("tiny-opt", ["method.qk_dims=true"]),
    "opt-mha-values": ("tiny-opt", []),
    "qwen2-biases-qk": ("tiny-qwen2", ["method.qk_dims=true"]),
    "gemma3-window-norms": ("tiny-llama", GEMMA3),
    "mistral-window-qk": ("tiny-llama", [*MISTRAL, "method.qk_dims=true"]),
}
_compressed: dict[str, torch.nn.Module] = {}


def thin_model(case: str) -> torch.nn.Module:
    if case not in _compressed:
        name, extra = CASES[case]
        _compressed[case] = compress_in_memory(*tiny_overrides(name), *THIN, *extra).model.eval()
    return _compressed[case]


def padded_copy(model: torch.nn.Module) -> torch.nn.Module:
    padded = copy.deepcopy(model)
    for module in padded.modules():
        padded_attention(module)
    return padded


def thin_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if is_thin(m)]


@pytest.mark.parametrize("case", list(CASES))
def test_thin_attention_computes_the_padded_logits_in_prefill_and_cached_decode(case):
    model = thin_model(case)
    padded = padded_copy(model)
    attentions = thin_attentions(model)
    assert attentions and not thin_attentions(padded)
    if "qk" in case:
        assert all(a.shrink_qk_places is not None for a in attentions)
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        thin, reference = model(input_ids=ids).logits, padded(input_ids=ids).logits
        assert torch.allclose(thin, reference, atol=1e-5, rtol=1e-5)
        kwargs = {
            "max_new_tokens": 6,
            "do_sample": False,
            "output_logits": True,
            "return_dict_in_generate": True,
        }
        a = model.generate(ids[:1, :12], **kwargs)
        b = padded.generate(ids[:1, :12], **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama-gqa-values", "opt-mha-qk"])
def test_the_eager_kernel_computes_each_product_at_its_own_width(case):
    model = copy.deepcopy(thin_model(case))
    padded = padded_copy(model)
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        for m in (model, padded):
            m.config._attn_implementation = "eager"
        eager = model(input_ids=ids).logits
        assert torch.allclose(eager, padded(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        assert torch.allclose(eager, fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama-gqa-qk", "opt-mha-values"])
def test_the_kv_cache_holds_keys_and_values_at_their_kept_widths(case):
    model = thin_model(case)
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        padded_cache = padded_copy(model)(input_ids=ids, use_cache=True).past_key_values
    for layer, padded_layer, attention in zip(
        cache.layers, padded_cache.layers, thin_attentions(model), strict=True
    ):
        widths = attention.shrink_widths
        kv_heads = padded_layer.keys.shape[1]
        assert tuple(layer.keys.shape) == (1, kv_heads, 9, widths["k"])
        assert tuple(layer.values.shape) == (1, kv_heads, 9, widths["v"])
        assert widths["v"] < attention.head_dim and padded_layer.values.shape[-1] == attention.head_dim
        thin_bytes = layer.keys.numel() + layer.values.numel()
        assert thin_bytes < padded_layer.keys.numel() + padded_layer.values.numel()


@pytest.mark.parametrize("case", ["llama-gqa-qk", "opt-mha-qk"])
def test_save_and_load_rebuild_the_thin_attention(case, tmp_path):
    model = thin_model(case)
    edits = [e for e in structural_edits(model, "causal_lm") if e["kind"] == "thin_attention"]
    assert len(edits) == len(thin_attentions(model))
    save(model, None, tmp_path / "model", "causal_lm")
    loaded = load(tmp_path / "model").eval()
    assert len(thin_attentions(loaded)) == len(edits)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_checkpoint_without_thin_attention_edits_loads_thin(tmp_path):
    import json

    model = thin_model("llama-gqa-values")
    save(model, None, tmp_path / "model", "causal_lm")
    manifest_path = tmp_path / "model" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["edits"] = [e for e in manifest["edits"] if e["kind"] != "thin_attention"]
    manifest_path.write_text(json.dumps(manifest))  # as written before attention ran thin
    loaded = load(tmp_path / "model").eval()
    assert len(thin_attentions(loaded)) == len(thin_attentions(model))
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_scores_are_priced_at_the_head_size_the_attention_computes_at():
    model = thin_model("llama-gqa-qk")
    from shrink.models import build_adapter

    adapter = build_adapter(model)
    seq_len = 64
    costs = CostModel(adapter, "macs", seq_len)
    padded = CostModel(build_adapter(padded_copy(model)), "macs", seq_len)
    for block, padded_block in zip(adapter.blocks(), padded.adapter.blocks(), strict=True):
        attention = adapter.attention(block)
        n_heads, _ = attention.counts()
        widths = block.self_attn.shrink_widths
        width = attention.score_width()
        assert width == max(widths["k"], widths["v"]) < attention.head_dim
        assert costs.scores(attention).macs == n_heads * width * (seq_len + 1)
        full = padded.scores(padded.adapter.attention(padded_block)).macs
        assert full == n_heads * attention.head_dim * (seq_len + 1)
        heads = costs.heads(attention)
        assert heads.thin and heads.score == pytest.approx(full / n_heads)


def test_a_split_rotary_pair_is_refused_before_the_attention_changes():
    model = copy.deepcopy(thin_model("llama-gqa-values"))
    attention = thin_attentions(model)[0]
    padded_attention(attention)
    places = torch.tensor([[0, 1], [0, 2]])  # dims 0 and 1 without their partners 8 and 9
    with pytest.raises(ValueError, match="rotary pair"):
        make_thin(attention, "rotary", {"q": 2, "k": 2, "v": 16}, places)
    assert not is_thin(attention)
    places, partners, signs = rotary_pairs(torch.tensor([[1, 3, 9, 11]]), 16)
    assert partners.tolist() == [[2, 3, 0, 1]] and signs.tolist() == [[-1.0, -1.0, 1.0, 1.0]]


def test_encoders_keep_padded_heads():
    model = compress_in_memory(*tiny_overrides("tiny-bert"), *THIN).model
    assert not thin_attentions(model)
    assert any(type(m).__name__ == "HeadPaddedLinear" for m in model.modules())
