"""What makes a shrink checkpoint a Hugging Face model folder.

When the compressed blocks are what the family's own code builds under a smaller config (every
block the same FFN width and head counts, plain linears), the folder gets that config as
config.json: `AutoModel*.from_pretrained` loads it with no shrink code. Quantized linears add
compressed-tensors' quantization_config, so transformers unpacks them itself. The candidate
config is checked by building the architecture from it (without weights) and comparing every
parameter's name and shape with the compressed model's, so a structure the family cannot express
(an added bias, a factor pair) never gets a config.json that would fail to load. One exception is
made for added biases (FLAP's bias compensation on o_proj and down_proj): where the family's config
can switch biases on (Llama's `attention_bias`, `mlp_bias`), `bias_padded_config` switches them on
and the checkpoint stores zero biases for the linears of those groups that have none, so the
family's own code computes the same model.

Any other structure (per-block widths, thinned heads, factor pairs, corrected linears) gets the
base config plus its edits (`shrink_edits`) and an `auto_map` naming `modeling_shrink.Shrink<Base>`,
with that self-contained file copied beside the weights: `from_pretrained(folder,
trust_remote_code=True)` builds the base class and applies the edits, reading packed linears
itself. Asymmetric packed grids go this way too: transformers' compressed-tensors loader (0.20)
sizes packed zero points as unpacked and refuses them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PretrainedConfig

from .. import modeling_shrink
from ..config import Head
from ..models import build_adapter
from ..models.loading import AUTO_CLASSES
from ..quantization.packing import is_quantized, quantization_config


def stock_config(model: nn.Module, head: str) -> PretrainedConfig | None:
    """The config under which transformers builds `model` as it is, or None."""
    config = _smaller_config(model)
    if config is None:
        return None
    return config if _shapes(model) == _shapes(_empty(config, head)) else None


def _smaller_config(model: nn.Module) -> PretrainedConfig | None:
    """The model's config with the widths and head counts its blocks share, or None."""
    values = build_adapter(model).stock_config()
    if values is None:
        return None
    config = copy.deepcopy(model.config)
    for key, value in values.items():
        setattr(config, key, value)
    return config


# config switches that give a family's block linears biases: key -> the sites whose linears get one
BIAS_SWITCHES = {"attention_bias": ("attn_in", "attn_out"), "mlp_bias": ("mlp_in", "mlp_out")}


def bias_padded_config(
    model: nn.Module, head: str
) -> tuple[PretrainedConfig, dict[str, torch.Tensor]] | None:
    """For a model of stock shapes whose block linears carry biases its config has switched off:
    the config with those switches on, and a zero bias for every linear they cover that has none
    (the family's code then computes the same model); None when that is not a stock folder."""
    config = _smaller_config(model)
    if config is None:
        return None
    adapter = build_adapter(model)
    switched = False
    for key, sites in BIAS_SWITCHES.items():
        if getattr(config, key, True):  # no such switch, or already on
            continue
        linears = [
            block.get_submodule(path)
            for block in adapter.blocks()
            for site in adapter.sites(block)
            if site.name in sites
            for path in site.linears
        ]
        if any(linear.bias is not None for linear in linears):
            setattr(config, key, True)
            switched = True
    if not switched:
        return None
    ours, theirs = _shapes(model), _shapes(_empty(config, head))
    missing = {name: shape for name, shape in theirs.items() if name not in ours}
    if any(ours[name] != theirs.get(name) for name in ours) or not all(n.endswith(".bias") for n in missing):
        return None
    dtype = next(model.parameters()).dtype
    return config, {name: torch.zeros(shape, dtype=dtype) for name, shape in missing.items()}


def _empty(config: PretrainedConfig, head: str) -> nn.Module:
    with init_empty_weights(include_buffers=False):
        return AUTO_CLASSES[Head(head)].from_config(config)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def write_hf_config(
    model: nn.Module, config: PretrainedConfig, folder: Path, quant: dict[str, Any] | None
) -> None:
    """config.json (and the generation config) of a folder transformers builds as it is, with
    compressed-tensors' quantization_config when its linears are packed: every Linear that holds no
    grid is listed in `ignore`."""
    config.save_pretrained(folder)
    _save_generation_config(model, folder)
    if quant is None:
        return
    from compressed_tensors.compressors import ModelCompressor

    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_quantized(m)]
    ModelCompressor(quantization_config=quantization_config(quant, ignore)).update_config(str(folder))


AUTO_KEYS = {
    Head.causal_lm: "AutoModelForCausalLM",
    Head.masked_lm: "AutoModelForMaskedLM",
    Head.sequence_classification: "AutoModelForSequenceClassification",
    Head.base: "AutoModel",
}


# what each kind of edit is, in the words of a note to a reader of config.json
EDIT_NAMES = {
    "low_rank": "rank-r factor pairs",
    "linear": "widths that differ from block to block",
    "head_padded": "thinned heads",
    "head_sliced": "thinned heads",
    "attr": "head counts that differ from block to block",
    "corrected": "low-rank corrections",
    "quantized": "packed weights",
    "shortcuts": "shortcut matrices of a rotated residual stream",
    "scaled_rms": "weightless norms of a rotated residual stream",
    "embedding_dim": "a sliced residual stream from the embedding on",
}
NOTE = "shrink_note"


def remote_code_reason(model: nn.Module, edits: list[dict[str, Any]]) -> str:
    """Why a folder needs trust_remote_code=True, in one sentence (config.json's first key, the
    model card's first line)."""
    kinds = list(dict.fromkeys(EDIT_NAMES.get(e["kind"], e["kind"]) for e in edits))
    return (
        f"Load with trust_remote_code=True: transformers' {type(model).__name__} cannot build this "
        f"structure ({', '.join(kinds) or 'edited layers'}) from a config, so modeling_shrink.py beside "
        "this file (torch and transformers only) builds it; without it, loading stops and asks for it."
    )


def write_remote_code(model: nn.Module, head: str, edits: list[dict[str, Any]], folder: Path) -> None:
    """config.json with the edits, an auto_map and a model type of its own (so that transformers
    refuses the folder without trust_remote_code instead of building the base class), and the
    modeling file. The reason comes first in config.json (`shrink_note`)."""
    config = copy.deepcopy(model.config)
    base = type(model).__name__
    config.architectures = [f"Shrink{base}"]
    config.shrink_edits = edits
    config.shrink_modeling_version = modeling_shrink.MODELING_VERSION
    config.save_pretrained(folder)
    values = json.loads((folder / "config.json").read_text())
    values["model_type"] = modeling_shrink.MODEL_TYPE_PREFIX + values["model_type"]
    values["auto_map"] = {
        "AutoConfig": f"modeling_shrink.Shrink{type(model.config).__name__}",
        AUTO_KEYS[Head(head)]: f"modeling_shrink.Shrink{base}",
    }
    values = {NOTE: remote_code_reason(model, edits), **values}
    (folder / "config.json").write_text(json.dumps(values, indent=2) + "\n")
    for name in modeling_shrink.MODELING_FILES:
        shutil.copyfile(Path(modeling_shrink.__file__).with_name(name), folder / name)
    _save_generation_config(model, folder)


def _save_generation_config(model: nn.Module, folder: Path) -> None:
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)


def write_hf_files(
    model: nn.Module, head: str, edits: list[dict[str, Any]], folder: Path, quant: dict[str, Any] | None
) -> bool:
    """Make `folder` a Hugging Face folder; `quant` is the run's quant config when linears are
    packed. Returns True when transformers builds it as it is, False when it needs the modeling
    file (trust_remote_code). Packed zero points always take the modeling file: transformers'
    compressed-tensors loader (0.20) sizes them as unpacked and refuses the checkpoint."""
    stock = stock_config(model, head) if quant is None or bool(quant.get("sym", True)) else None
    if stock is not None:
        write_hf_config(model, stock, folder, quant)
    else:
        write_remote_code(model, head, edits, folder)
    return stock is not None
