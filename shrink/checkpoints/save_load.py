"""Save and load compressed models: safetensors weights + a manifest of structural edits.

The manifest holds the base config and every module that differs from what that config builds
(low-rank pairs, resized linears). `load` rebuilds the base architecture without allocating its
weights, applies the edits, then assigns the saved tensors, so the logits equal the in-memory
compressed model's exactly. A model compressed with `stream=true` is written as shards (what
lies outside the blocks, then one shard per block, read from the run's block files) with a
transformers-style index, so saving it too holds one block at a time.

Quantized linears are stored packed in compressed-tensors' layout (`packing`), and unpacked on
load. When transformers builds the compressed structure under a smaller config (a run that only
quantizes or sparsifies, budget 1, or blocks thinned alike: `hf_folder`), the folder is also a
plain transformers checkpoint: its config.json (with compressed-tensors' quantization_config when
packed) lets `AutoModel*.from_pretrained` load it without shrink.
"""

from __future__ import annotations

import json
import os
import shutil
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from .. import modeling_shrink
from ..config import Head
from ..errors import ShrinkError, first_line
from ..hardware.devices import resolve_device
from ..modeling_shrink_attention import THIN_MARK, is_thin
from ..models import build_adapter
from ..models.base import BlockState
from ..models.edits import (
    CorrectedLinear,
    HeadPaddedLinear,
    HeadSlicedLinear,
    LowRankLinear,
    ScaledRMSNorm,
)
from ..models.loading import AUTO_CLASSES
from ..quantization.packing import ZERO, is_quantized, pack, quantized_bits, register_grid, unpack
from .hf_folder import bias_padded_config, stock_config, write_hf_config, write_hf_files

FORMAT = "shrink-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


def _auto_class(head: str):
    return AUTO_CLASSES[Head(head)]


def _empty_model(config, head: str) -> nn.Module:
    """The base architecture with parameters on the meta device (buffers stay real)."""
    with init_empty_weights(include_buffers=False):
        return _auto_class(head).from_config(config)


def reference_modules(model: nn.Module, head: str) -> dict[str, nn.Module]:
    """The base architecture's modules by path (built on the meta device), to compare edits with."""
    return dict(_empty_model(model.config, head).named_modules())


def structural_edits(
    model: nn.Module, head: str, reference: dict[str, nn.Module] | None = None
) -> list[dict[str, Any]]:
    """Every module whose type or shape differs from the base architecture's (`reference`, when a
    caller that asks often has built it once)."""
    reference = reference if reference is not None else reference_modules(model, head)
    edits: list[dict[str, Any]] = []
    inside: list[str] = []  # the factors of a pair, a corrected linear's parts: rebuilt with it
    corrected: list[dict[str, Any]] = []
    sliced: list[dict[str, Any]] = []  # after the norms they hook into are rebuilt
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in inside):
            continue
        taps = getattr(module, modeling_shrink.TAPS, None)
        if taps is not None:  # a sliced block: its shortcut maps and the hooks that route them
            attn, mlp = (module.get_submodule(name) for name in modeling_shrink.SHORTCUTS)
            sliced.append(
                {
                    "kind": "shortcuts",
                    "path": path,
                    "taps": dict(taps),
                    "in": attn.in_features,
                    "mid": attn.out_features,
                    "out": mlp.out_features,
                }
            )
            inside.extend(f"{path}.{name}" for name in modeling_shrink.SHORTCUTS)
        if isinstance(module, CorrectedLinear):  # the base in its place, the correction after
            inside.append(path + ".")
            corrected.append({"kind": "corrected", "path": path, "rank": module.rank})
            module = module.base
        edit = _module_edit(path, module, reference)
        if edit is not None:
            edits.append(edit)
        if isinstance(module, LowRankLinear):
            inside.append(path + ".")
    edits.extend(corrected)
    edits.extend(sliced)
    edits.extend(_attribute_edits(model, reference))
    edits.extend(  # after the projections they read the widths of
        {
            "kind": "thin_attention",
            "path": path,
            "style": getattr(type(module), THIN_MARK),
            "names": dict(module.shrink_projections),
        }
        for path, module in model.named_modules()
        if is_thin(module)
    )
    edits.extend(
        {
            "kind": "quantized",
            "path": path,
            "groups": module.weight_scale.shape[-1],
            "zero_point": ZERO in module._buffers,
            "bits": quantized_bits(module),
        }
        for path, module in model.named_modules()
        if is_quantized(module)
    )  # after the edits that build these linears
    return edits


def _module_edit(path: str, module: nn.Module, reference: dict[str, nn.Module]) -> dict[str, Any] | None:
    """The edit that rebuilds `module` at `path` from the base architecture, None if it is the same."""
    if isinstance(module, nn.Embedding):
        ref = reference.get(path)
        if isinstance(ref, nn.Embedding) and ref.embedding_dim != module.embedding_dim:
            return {"kind": "embedding_dim", "path": path, "dim": module.embedding_dim}
        return None
    if isinstance(module, ScaledRMSNorm):
        return {
            "kind": "scaled_rms",
            "path": path,
            "mean_dim": module.mean_dim,
            "eps": module.eps,
            "center": module.center,
        }
    if isinstance(module, LowRankLinear):
        return {
            "kind": "low_rank",
            "path": path,
            "in": module.in_features,
            "out": module.out_features,
            "rank": module.rank,
            "bias": module.second.bias is not None,
        }
    if isinstance(module, (HeadPaddedLinear, HeadSlicedLinear)):
        edit = {
            "kind": "head_padded" if isinstance(module, HeadPaddedLinear) else "head_sliced",
            "path": path,
            "in": module.in_features,
            "out": module.out_features,
            "heads": module.heads,
            "width": module.width,
            "head_dim": module.head_dim,
            "bias": module.bias is not None,
        }
        if isinstance(module, HeadPaddedLinear) and module.positions is not None:
            edit["positions"] = module.positions.tolist()
        return edit
    if isinstance(module, nn.Linear):
        ref = reference.get(path)
        shape = (module.in_features, module.out_features, module.bias is not None)
        if (
            not isinstance(ref, nn.Linear)
            or (ref.in_features, ref.out_features, ref.bias is not None) != shape
        ):
            return {"kind": "linear", "path": path, "in": shape[0], "out": shape[1], "bias": shape[2]}
    return None


def _attribute_edits(model: nn.Module, reference: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """Head-count attributes of attention modules that differ from the base architecture."""
    adapter = build_adapter(model)
    edits = []
    for index in range(len(adapter.blocks())):
        prefix = adapter.block_path(index)
        for rel, attributes in adapter.head_attributes.items():
            path = f"{prefix}.{rel}"
            module = model.get_submodule(path)
            for name in attributes:
                value = getattr(module, name)
                if value != getattr(reference[path], name):
                    edits.append({"kind": "attr", "path": path, "name": name, "value": value})
    return edits


def save(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    folder: str | Path,
    head: str,
    info: dict[str, Any] | None = None,
    block_states: BlockState | None = None,
    quant: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint to `folder` atomically (a partial save never looks complete).
    `block_states(i)` gives block i's tensors when the model's blocks are on the meta device
    (`stream=true`); the weights are then sharded by block. `quant` (the run's quant config) is
    needed when linears are quantized: they are stored packed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    edits = structural_edits(model, head)
    quantized = any(e["kind"] == "quantized" for e in edits)
    # biases a method added (FLAP's) that the family's config can switch on: a stock folder
    padded = None
    if not quantized and block_states is None and stock_config(model, head) is None:
        padded = bias_padded_config(model, head)
    if padded is not None:  # the family builds every module from that config: no edit to rebuild
        edits = []
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "head": str(Head(head).value),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config": (padded[0] if padded is not None else model.config).to_dict(),
        "edits": edits,
        "info": info or {},
    }
    if quantized:
        if quant is None or quant.get("name", "none") == "none":
            raise ShrinkError("save: the model has quantized linears but no quant config was given")
        manifest["quantization"] = dict(quant)
    if padded is not None:
        save_file({**_unique_tensors(model, ()), **padded[1]}, str(tmp / WEIGHTS))
    elif block_states is None and not quantized:
        save_model(model, str(tmp / WEIGHTS))
    elif block_states is None:
        save_file(pack(_unique_tensors(model, ()), quant), str(tmp / WEIGHTS))
    else:
        _save_sharded(model, tmp, block_states, quant if quantized else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if padded is not None:
        write_hf_config(model, padded[0], tmp, None)
    else:
        write_hf_files(model, head, manifest["edits"], tmp, quant if quantized else None)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    _apply_umask(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _apply_umask(folder: Path) -> None:
    """safetensors writes its files owner-only (0600); give every file of the checkpoint the mode a
    plain `open` would (0666 less the umask), so a shared checkpoint is readable as usual."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


def _unique_tensors(model: nn.Module, skip: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The model's tensors outside the `skip` prefixes, tied tensors once (load re-ties them)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if not tensor.is_meta and not name.startswith(skip) and key not in seen:
            seen.add(key)
            tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


def _save_sharded(
    model: nn.Module, folder: Path, block_states: BlockState, quant: dict[str, Any] | None
) -> None:
    adapter = build_adapter(model)
    prefixes = [adapter.block_path(i) + "." for i in range(len(adapter.blocks()))]
    rest = _unique_tensors(model, tuple(prefixes))
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(len(prefixes) + 1):  # shard 1: outside the blocks; shard k + 2: block k
        tensors = rest if k == 0 else {prefixes[k - 1] + n: t for n, t in block_states(k - 1).items()}
        if quant is not None:
            tensors = pack(tensors, quant)
        file = f"model-{k + 1:05d}-of-{len(prefixes) + 1:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / file))
        weight_map |= dict.fromkeys(tensors, file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=1))


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: the lone file, or the shards its index names."""
    if (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        weight_map = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    return [folder / WEIGHTS]


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder of `path`, a run folder or a checkpoint folder itself; None if neither."""
    for folder in (path / "model", path):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShrinkError(f"{str(folder)!r} is not a shrink checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShrinkError(f"{path}: not a JSON manifest ({first_line(err)})") from None
    if not isinstance(manifest, dict):
        raise ShrinkError(f"{path}: not a shrink manifest (a JSON {type(manifest).__name__})")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShrinkError(
            f"{path} has format {manifest.get('format')!r} v{manifest.get('version')}; "
            f"expected {FORMAT} v{VERSION}"
        )
    return manifest


def apply_edit(model: nn.Module, edit: dict[str, Any], dtype: torch.dtype) -> None:
    """Rebuild one manifest edit on the meta device (the weights are assigned afterwards)."""
    if edit["kind"] == "quantized":
        register_grid(model.get_submodule(edit["path"]), edit["groups"], edit["zero_point"], edit["bits"])
        return
    try:
        modeling_shrink.apply_edit(model, edit, device="meta", dtype=dtype)
    except ValueError as err:
        raise ShrinkError(f"manifest: {err}, quantized") from None


def load(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compressed model saved by `save` (weights read with safetensors only)."""
    device = resolve_device(device)
    folder = Path(folder)
    manifest = read_manifest(folder)
    config_dict = dict(manifest["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    dtype = getattr(torch, manifest["dtype"])
    model = _empty_model(config, manifest["head"])
    for edit in manifest["edits"]:
        apply_edit(model, edit, dtype)
    if not any(edit["kind"] == "thin_attention" for edit in manifest["edits"]):
        adapter = build_adapter(model)  # a checkpoint written before attention ran thin
        for block in adapter.blocks():
            adapter.thin_widths(block)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        try:
            state |= load_file(str(file), device=str(device))
        except (SafetensorError, OSError) as err:
            raise ShrinkError(f"{file}: not a readable safetensors file ({first_line(err)})") from None
    if "quantization" in manifest:
        state = unpack(state, manifest["quantization"], str(folder))
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shapes that differ from what the manifest rebuilds
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line] or [
            first_line(err)
        ]
        raise ShrinkError(f"{folder}: the weights do not match {MANIFEST} ({lines[0]})") from None
    if result.unexpected_keys:
        raise ShrinkError(f"{folder}: weights not in the rebuilt model: {result.unexpected_keys[:5]}")
    # Tied tensors are saved once; tie the missing name to the one present (either direction).
    model.tie_weights(missing_keys=set(result.missing_keys))
    tensors = chain(model.named_parameters(), model.named_buffers())
    still_empty = [n for n, t in tensors if t.device.type == "meta"]
    if still_empty:
        raise ShrinkError(f"{folder}: checkpoint lacks weights for {still_empty[:5]}")
    model.to(device)
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, without its modeling file: a checkpoint of a structure of its own
    names that file in config.json, which AutoTokenizer would otherwise offer to run (a prompt, or
    an error where no one can answer) and then warn that the model type is unknown to it."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)
