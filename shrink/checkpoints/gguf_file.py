"""A compressed model as a GGUF file that llama.cpp runs (and Ollama, LM Studio on top of it).

llama.cpp's `deci` architecture builds every block from per-layer arrays: `feed_forward_length`,
`attention.head_count` and `attention.head_count_kv` (as Nemotron's pruned Llamas need), with one
head size for queries, keys and values. So a block keeps its own FFN width and head counts, while
thinned heads are written padded back to the head size exactly (zero rows of q/k/v at the dropped
places, zero columns of o_proj): the padded layers compute what the thin ones do. Queries and keys
are permuted from Hugging Face's rotary layout (dims i and i + d/2 turn together) to llama.cpp's
(dims 2i and 2i + 1), as llama.cpp's own converter does for Llama.

Types: `f32`, `f16` and `bf16` are written directly, `q8_0` with gguf-py's implementation of
llama.cpp's Q8_0 (a tensor whose rows are not whole blocks of 32 stays f16). Every other type
(`q4_k_m`, `q5_k_m`, `q6_k`, `q4_0`, …) is llama.cpp's own quantizer run on an f16 file, through
the llama-cpp-python bindings (`pip install -e .[gguf]`), which also picks its fallbacks. For the
quantized types each FFN is padded with zero neurons to a multiple of 32, so that its down
projection's rows are whole blocks (a width such as 461 would stay f16). The
tokenizer and chat template are copied from a GGUF of the base model (the packaged one, a
`model=gguf` file, or `--vocab FILE`); tiny test models get their byte vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ShrinkError
from ..models import build_adapter
from ..models.edits import (
    CorrectedLinear,
    HeadPaddedLinear,
    HeadSlicedLinear,
    LowRankLinear,
    ScaledRMSNorm,
    head_places,
)

ARCH = "deci"
DIRECT = ("f32", "f16", "bf16", "q8_0")
FLOATS = ("f32", "f16", "bf16")
QUANT_BLOCK = 32  # values per block of Q8_0, Q4_0, Q5_0 (k-quants: 256)
# llama.cpp's quantizer (llama_ftype), by the names its `llama-quantize` tool takes
LLAMA_CPP = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
TYPES = (*DIRECT, *LLAMA_CPP)
FAMILIES = ("llama", "qwen2")  # pre-norm, gated MLP, rotary attention: what `deci` computes


def check_type(kind: str) -> None:
    if kind not in TYPES:
        raise ShrinkError(f"GGUF type {kind!r} is not one shrink writes; valid: {', '.join(TYPES)}")
    if kind in LLAMA_CPP:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ShrinkError(
                f"GGUF type {kind} is quantized by llama.cpp's own quantizer, from the llama-cpp-python "
                'bindings: pip install -e ".[gguf]" (see the README), or write f16/q8_0'
            ) from None


def check_model(model: nn.Module) -> None:
    """One line naming what a GGUF of `deci` cannot hold, before anything is written."""
    config = model.config
    if config.model_type not in FAMILIES:
        raise ShrinkError(
            f"GGUF export writes the Llama family (llama.cpp's deci architecture); model_type "
            f"{config.model_type!r} is not one (valid: {', '.join(FAMILIES)})"
        )
    if getattr(config, "rope_scaling", None) not in (None, {}) and _rope_type(config) != "default":
        raise ShrinkError(
            f"GGUF export: rope scaling {_rope_type(config)!r} is not written yet; only plain rotary"
        )
    if getattr(config, "use_sliding_window", False):
        raise ShrinkError("GGUF export: sliding-window attention has no per-layer form in deci")
    for path, module in model.named_modules():
        kind = {
            LowRankLinear: "a factor pair (low-rank methods)",
            CorrectedLinear: "a low-rank quantization correction",
            ScaledRMSNorm: "a weightless norm of a rotated stream (slicegpt)",
        }.get(type(module))
        if kind is None and hasattr(module, "attn_shortcut"):
            kind = "shortcut matrices (slicegpt)"
        if kind is not None:
            raise ShrinkError(
                f"GGUF export: {path} is {kind}, which llama.cpp's deci blocks cannot hold (one matrix "
                "per projection, one residual width); export a pruned model (id, flap, wanda-sp, …)"
            )


def _rope_type(config: Any) -> str:
    scaling = getattr(config, "rope_scaling", None) or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


# ---- tensors ---------------------------------------------------------------------------------------
def full_weight(module: nn.Module, head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a projection at full head size: a thinned one's rows (or an output
    projection's columns) put back at their places in zero-padded heads."""
    weight = module.weight.detach().to(torch.float32)
    bias = None if module.bias is None else module.bias.detach().to(torch.float32)
    if isinstance(module, HeadPaddedLinear):
        if module.positions is not None:
            places = head_places(module.positions, head_dim)
        else:
            places = head_places(torch.arange(module.width).repeat(module.heads, 1), head_dim)
        full = weight.new_zeros(module.heads * head_dim, weight.shape[1])
        full[places] = weight
        if bias is not None:
            bias = bias.new_zeros(module.heads * head_dim).index_copy_(0, places, bias)
        return full, bias
    if isinstance(module, HeadSlicedLinear):
        places = head_places(torch.arange(module.width).repeat(module.heads, 1), head_dim)
        full = weight.new_zeros(weight.shape[0], module.heads * head_dim)
        full[:, places] = weight
        return full, bias
    return weight, bias


def padded_weights(model: nn.Module) -> tuple[int, int]:
    """(zero weights the GGUF's attention holds, blocks whose heads are thinned): what writing each
    thinned head back at the full head size adds to the file, which llama.cpp also reads and
    multiplies at every token."""
    adapter = build_adapter(model)
    head_dim = adapter.heads().head_dim
    a = adapter.attention_paths
    zeros, thinned = 0, 0
    for block in adapter.blocks():
        added = 0
        for path in (a.q, a.k, a.v, a.o):
            module = block.get_submodule(path)
            rows, columns = module.weight.shape
            if isinstance(module, HeadPaddedLinear):
                rows = module.heads * head_dim
            elif isinstance(module, HeadSlicedLinear):
                columns = module.heads * head_dim
            added += rows * columns - module.weight.numel()  # the shape full_weight writes
        zeros += added
        thinned += added > 0
    return zeros, thinned


def rotary_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows (or bias entries) of q or k from Hugging Face's rotary layout, where dims i and i + d/2
    of a head turn together, to llama.cpp's, where dims 2i and 2i + 1 do."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def block_tensors(
    model: nn.Module, ffn_multiple: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """Every tensor of the GGUF by its llama.cpp name, and the per-layer widths; each FFN padded
    with zero neurons to a multiple of `ffn_multiple` (a zero gate and up row give silu(0)·0 = 0,
    which a zero column of down reads: the same outputs)."""
    adapter = build_adapter(model)
    head_dim = adapter.heads().head_dim
    a = adapter.attention_paths
    tensors: dict[str, torch.Tensor] = {}
    widths: dict[str, list[int]] = {"ffn": [], "heads": [], "kv_heads": []}
    for i, block in enumerate(adapter.blocks()):
        q, qb = full_weight(block.get_submodule(a.q), head_dim)
        k, kb = full_weight(block.get_submodule(a.k), head_dim)
        v, vb = full_weight(block.get_submodule(a.v), head_dim)
        o, ob = full_weight(block.get_submodule(a.o), head_dim)
        heads, kv_heads = q.shape[0] // head_dim, k.shape[0] // head_dim
        named = {
            "attn_norm.weight": block.get_submodule(adapter.stream_paths["attn_norm"]).weight,
            "ffn_norm.weight": block.get_submodule(adapter.stream_paths["mlp_norm"]).weight,
            "attn_q.weight": rotary_to_interleaved(q, heads),
            "attn_k.weight": rotary_to_interleaved(k, kv_heads),
            "attn_v.weight": v,
            "attn_output.weight": o,
            "attn_q.bias": None if qb is None else rotary_to_interleaved(qb, heads),
            "attn_k.bias": None if kb is None else rotary_to_interleaved(kb, kv_heads),
            "attn_v.bias": vb,
            "attn_output.bias": ob,
        }
        ffn = int(block.get_submodule(adapter.mlp_paths["mlp_out"][0]).in_features)
        extra = -ffn % ffn_multiple
        mlp = (*adapter.mlp_paths["mlp_in"], *adapter.mlp_paths["mlp_out"])  # gate, up, down
        for role, path in zip(("gate", "up", "down"), mlp, strict=True):
            linear = block.get_submodule(path)
            weight, bias = linear.weight.detach(), linear.bias
            if role == "down":
                weight = nn.functional.pad(weight, (0, extra))
            else:
                weight = nn.functional.pad(weight, (0, 0, 0, extra))
                bias = None if bias is None else nn.functional.pad(bias.detach(), (0, extra))
            named[f"ffn_{role}.weight"], named[f"ffn_{role}.bias"] = weight, bias
        for name, tensor in named.items():
            if tensor is not None:
                tensors[f"blk.{i}.{name}"] = tensor.detach().to(torch.float32)
        widths["ffn"].append(ffn + extra)
        widths["heads"].append(heads)
        widths["kv_heads"].append(kv_heads)
    tensors["token_embd.weight"] = model.get_input_embeddings().weight.detach().to(torch.float32)
    tensors["output_norm.weight"] = adapter.final_norm().weight.detach().to(torch.float32)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        tensors["output.weight"] = head.weight.detach().to(torch.float32)
    return tensors, widths


# ---- the tokenizer -------------------------------------------------------------------------------
Vocab = dict[str, tuple[Any, Any, Any]]  # key -> (value, GGUF value type, element type of an array)


def vocab_from_gguf(path: Path) -> Vocab:
    """The tokenizer keys (`tokenizer.*`: tokens, merges, types, special ids, chat template) of a
    GGUF file, as they are stored there."""
    from gguf import GGUFReader, GGUFValueType

    if not path.is_file():
        raise ShrinkError(f"GGUF vocabulary file {str(path)!r} does not exist")
    reader = GGUFReader(str(path))
    keys: Vocab = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            sub = field.types[1] if main == GGUFValueType.ARRAY and len(field.types) > 1 else None
            keys[key] = (field.contents(), main, sub)
    if "tokenizer.ggml.tokens" not in keys:
        raise ShrinkError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    return keys


def byte_vocab(tokenizer: Any, rows: int) -> Vocab:
    """A byte-level BPE tokenizer without merges (shrink's tiny test models) written as GGUF's
    `gpt2` model, its token list padded to the embedding's `rows`. llama.cpp's BPE needs a merges
    key and GGUF stores no empty array, so it holds one merge of two control tokens, which never
    meet in text."""
    from gguf import GGUFValueType, TokenType

    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_tokens)
    types = [int(TokenType.CONTROL if t in special else TokenType.NORMAL) for t in tokens]
    tokens += [f"<unused{i}>" for i in range(rows - len(tokens))]
    types += [int(TokenType.UNUSED)] * (rows - len(types))
    array, string, u32 = GGUFValueType.ARRAY, GGUFValueType.STRING, GGUFValueType.UINT32
    return {
        "tokenizer.ggml.model": ("gpt2", string, None),
        "tokenizer.ggml.pre": ("default", string, None),
        "tokenizer.ggml.tokens": (tokens, array, string),
        "tokenizer.ggml.token_type": (types, array, GGUFValueType.INT32),
        "tokenizer.ggml.merges": ([f"{tokenizer.bos_token} {tokenizer.eos_token}"], array, string),
        "tokenizer.ggml.bos_token_id": (int(tokenizer.bos_token_id), u32, None),
        "tokenizer.ggml.eos_token_id": (int(tokenizer.eos_token_id), u32, None),
        "tokenizer.ggml.padding_token_id": (int(tokenizer.pad_token_id), u32, None),
        "tokenizer.ggml.add_bos_token": (False, GGUFValueType.BOOL, None),
    }


# ---- writing -------------------------------------------------------------------------------------
def write(model: nn.Module, out: Path, kind: str, vocab: Vocab, name: str) -> Path:
    """Write `model` to the GGUF file `out` as `kind` (atomically: a partial file never has the
    final name); returns `out`."""
    import gguf

    check_type(kind)
    check_model(model)
    # a quantized row is whole blocks of 32 (llama.cpp's quantizer falls back from k-quants' 256 on
    # its own): FFN widths are padded to that; float types keep them as they are
    tensors, widths = block_tensors(model, 1 if kind in FLOATS else QUANT_BLOCK)
    config = model.config
    head_dim = build_adapter(model).heads().head_dim
    direct = kind if kind in DIRECT else "f16"
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(out.name + (".partial" if kind in DIRECT else ".f16.partial"))
    writer = gguf.GGUFWriter(str(staged), ARCH)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(widths["ffn"]))
    writer.add_feed_forward_length(widths["ffn"])
    writer.add_head_count(widths["heads"])
    writer.add_head_count_kv(widths["kv_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(tensors["token_embd.weight"].shape[0]))
    writer.add_file_type(_file_type(direct))
    for key, (value, vtype, sub) in vocab.items():
        writer.add_key_value(key, value, vtype, sub)
    for tensor_name, tensor in tensors.items():
        data, raw = _encode(tensor, direct)
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if kind in DIRECT:
        os.replace(staged, out)
        return out
    try:
        _llama_cpp_quantize(staged, out, kind)
    finally:
        staged.unlink(missing_ok=True)
    return out


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _file_type(kind: str) -> int:
    from gguf import LlamaFileType

    return int(
        {
            "f32": LlamaFileType.ALL_F32,
            "f16": LlamaFileType.MOSTLY_F16,
            "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0,
        }[kind]
    )


def _encode(tensor: torch.Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """A tensor's data as stored: vectors (norms, biases) in f32; matrices in `kind`, a q8_0 matrix
    whose rows are not whole blocks of 32 in f16 (llama.cpp cannot block it)."""
    from gguf import GGMLQuantizationType, quants

    data = tensor.numpy().astype(np.float32)
    if data.ndim == 1 or kind == "f32":
        return data, None
    if kind == "q8_0" and data.shape[-1] % 32 == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    if kind == "bf16":
        return quants.quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    return data.astype(np.float16), None


def _llama_cpp_quantize(source: Path, out: Path, kind: str) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) from the
    f16 file `source` to `out`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP[kind])
    params.nthread = os.cpu_count() or 1
    partial = out.with_name(out.name + ".partial")
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if code != 0:
        partial.unlink(missing_ok=True)
        raise ShrinkError(f"llama.cpp's quantizer failed on {source.name} for {kind} (code {code})")
    os.replace(partial, out)


def default_name(out: Path, kind: str) -> Path:
    """Where a run's GGUF goes by default: `<run>/model-<type>.gguf`."""
    return out / f"model-{kind}.gguf"
