"""Load a model and tokenizer from any source: packaged asset, hub id, local dir, GGUF, tiny random.

Weights are read from safetensors only, and remote code stays off unless the model config turns
it on. Hub ids fail fast, with the offline alternatives named, when no hub can be reached.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from ..config import Head, ModelConf, Source
from ..data import hub
from ..errors import ShrinkError, first_line
from ..modeling_shrink import MODEL_TYPE_PREFIX
from .base import Adapter
from .catalog import is_local_path, local_hint, offline_models
from .device_map import is_mapped, loading_kwargs, onload_outside_blocks
from .families import adapter_class_for, supported_model_types
from .packaged import PACKAGED, check_installed, gguf_model_dir, packaged_model_dir

AUTO_CLASSES = {
    Head.causal_lm: AutoModelForCausalLM,
    Head.masked_lm: AutoModelForMaskedLM,
    Head.sequence_classification: AutoModelForSequenceClassification,
    Head.base: AutoModel,
}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter


_HANDED_OVER: dict[str, Loaded] = {}


def model_identity(model_cfg: DictConfig, seed: int) -> dict[str, Any]:
    """What names a loaded model's weights, to key caches of what it computes: its config without
    the placement keys (where the weights sit is not what they are), and the seed only for a tiny
    random model (a packaged or saved model's weights do not depend on it)."""
    model = OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)
    for placement_only in ("device_map", "max_memory"):
        model.pop(placement_only, None)
    return {"model": model, "seed": seed if model.get("source") == Source.tiny.value else None}


@contextmanager
def handed_over(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Iterator[str]:
    """Lend a model already in memory (the Python API) to the loader for the duration: configs
    name it `model.source=memory model.path=<the key yielded>`. It is used as it is, on the CPU,
    and edited in place."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        model.to("cpu")  # the runner brings one block at a time to the device
    model.eval()
    model.requires_grad_(False)
    key = f"model-{id(model):x}"
    _HANDED_OVER[key] = Loaded(model, tokenizer, build_adapter(model))
    try:
        yield key
    finally:
        _HANDED_OVER.pop(key, None)


def _handed(cfg: ModelConf) -> Loaded:
    if cfg.path not in _HANDED_OVER:
        raise ShrinkError(
            f"model.source=memory names a model handed to shrink.compress or shrink.evaluate; "
            f"{cfg.path!r} is none (from the command line, use model=local model.path=<folder>)"
        )
    return _HANDED_OVER[cfg.path]


def _hub_cached(repo_id: str, revision: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def check_source(cfg: ModelConf) -> None:
    """Cheap checks that a model can be had at all, before anything is loaded."""
    if cfg.source == Source.packaged:
        if cfg.path not in PACKAGED:
            hint = f"; a local model loads with {local_hint(cfg.path)}" if is_local_path(cfg.path) else ""
            raise ShrinkError(
                f"unknown packaged model {cfg.path!r}; valid: {', '.join(sorted(PACKAGED))}{hint}"
            )
        check_installed(cfg.path)
    elif cfg.source == Source.hub:
        if not _hub_cached(cfg.path, cfg.revision) and not hub.reachable():
            raise ShrinkError(
                f"model {cfg.name!r} (hub id {cfg.path!r}) is not available offline: no hub connection "
                f"and not in the local cache; offline: {offline_models()}"
            )
    elif cfg.source == Source.local:
        if not (Path(cfg.path) / "config.json").is_file():
            raise ShrinkError(f"local model folder {cfg.path!r} has no config.json")
        check_not_compressed(Path(cfg.path))
        check_weight_files(Path(cfg.path))
    elif cfg.source == Source.memory:
        _handed(cfg)
    elif cfg.source == Source.tiny and not hasattr(transformers, cfg.path):
        raise ShrinkError(f"tiny model config class {cfg.path!r} is not in transformers")


def check_not_compressed(folder: Path) -> None:
    """A shrink checkpoint whose structure only its modeling file builds (factor pairs, per-block
    widths) is not a model shrink's adapters know: say so, instead of failing in the cost model."""
    try:
        model_type = str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config.json is reported when AutoConfig reads it
    if model_type.startswith(MODEL_TYPE_PREFIX):
        raise ShrinkError(
            f"model.path={folder} is a shrink checkpoint ({model_type}) whose structure only its "
            "modeling file builds, which shrink does not compress again: start from its base model, or "
            "run it with shrink.load(folder), or in transformers with trust_remote_code=True"
        )


def check_weight_files(folder: Path) -> None:
    """Every safetensors file in a local folder has a readable header that covers the file: a
    truncated or corrupt file fails here, named, before anything loads (the tensors are mapped,
    not read, so this is cheap)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ShrinkError(
            f"local model folder {str(folder)!r} has no .safetensors weights (only safetensors are read)"
        )
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ShrinkError(f"weights file {str(file)!r} is truncated or corrupt: {err}") from None


def pretrained_folder(cfg: ModelConf) -> str:
    """Where from_pretrained reads the model: a local folder or a hub id."""
    if cfg.source == Source.packaged:
        return str(packaged_model_dir(cfg.path))
    if cfg.source == Source.gguf:
        return str(gguf_model_dir(cfg.path))
    return cfg.path


def pretrained_kwargs(cfg: ModelConf) -> dict:
    """from_pretrained's keyword arguments: remote code (off unless configured), the revision, offline."""
    kw: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.source == Source.hub:
        kw["revision"] = cfg.revision
        if not hub.reachable():
            kw["local_files_only"] = True
    return kw


def load_config(cfg: ModelConf) -> PretrainedConfig:
    """The model's config (cheap): validation reads context length and family from it."""
    check_source(cfg)
    if cfg.source == Source.tiny:
        config = getattr(transformers, cfg.path)(**dict(cfg.tiny))
    elif cfg.source == Source.memory:
        config = _handed(cfg).model.config
    else:
        config = _pretrained_config(cfg)
    if adapter_class_for(config.model_type) is None:
        raise ShrinkError(
            f"model {cfg.name!r} has model_type {config.model_type!r}, which has no adapter; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return config


def skeleton(cfg: ModelConf, config: PretrainedConfig) -> Adapter:
    """The architecture built on the meta device (no weights, no memory): what validation needs
    to check block maps and plans before anything loads."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build_adapter(AUTO_CLASSES[Head(cfg.head)].from_config(config))


def _pretrained_config(cfg: ModelConf) -> PretrainedConfig:
    """AutoConfig's reading of the model's config.json, its failures as one line each."""
    folder = pretrained_folder(cfg)
    try:
        return AutoConfig.from_pretrained(folder, **pretrained_kwargs(cfg))
    except (ValueError, OSError, KeyError) as err:  # bad JSON, unknown model_type, remote code
        if "trust_remote_code" in str(err) and not cfg.trust_remote_code:
            raise ShrinkError(
                f"model {cfg.name!r} ({folder}) needs its own modeling code, which is off by default: "
                "set model.trust_remote_code=true if you trust that code"
            ) from None
        raise ShrinkError(f"model {cfg.name!r}: its config cannot be read: {first_line(err)}") from None


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A 256-byte tokenizer (+ BOS/EOS/PAD) for tiny random models: no files, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_adapter(model: nn.Module) -> Adapter:
    cls = adapter_class_for(model.config.model_type)
    if cls is None:
        raise ShrinkError(
            f"model_type {model.config.model_type!r} has no adapter; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return cls(model)


def load_model(
    cfg: ModelConf, dtype: torch.dtype, seed: int = 0, offload_folder: str | Path | None = None
) -> Loaded:
    """Load weights (safetensors only) and tokenizer on the CPU, where the runner moves blocks to
    devices; or, with `cfg.device_map`, spread over devices by accelerate, which may offload
    weights that it must convert to `offload_folder` (the modules outside the blocks are then
    read in: see device_map.py)."""
    config = load_config(cfg)
    if cfg.source == Source.memory:
        return _handed(cfg)
    auto = AUTO_CLASSES[Head(cfg.head)]
    if cfg.source == Source.tiny:
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype)
        tokenizer = byte_tokenizer()
    else:
        folder, kw = pretrained_folder(cfg), pretrained_kwargs(cfg)
        if cfg.device_map is not None:
            kw |= loading_kwargs(cfg, offload_folder or tempfile.mkdtemp(prefix="shrink-offload-"))
        try:
            model = auto.from_pretrained(folder, dtype=dtype, use_safetensors=True, **kw)
        except (OSError, SafetensorError) as err:
            raise ShrinkError(
                f"model {cfg.name!r}: no safetensors weights could be loaded from {folder!r} ({err})"
            ) from err
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model.eval()
    model.requires_grad_(False)
    adapter = build_adapter(model)
    if is_mapped(model):
        onload_outside_blocks(model, adapter)
    return Loaded(model, tokenizer, adapter)
