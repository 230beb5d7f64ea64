"""Models larger than memory (`stream=true`): the blocks are read from the safetensors shards one
at a time.

transformers loads everything outside the blocks (embeddings, final norm, head, rotary tables)
from a copy of the config with zero layers, so its own key mapping, weight tying and buffer
initialisation apply, and the block tensors it skips are never read (the shards are memory-mapped).
The blocks are built on the meta device, holding no memory, and put into the model's block list.
`fetch(i)` then reads block i's tensors from the shards, opening only the files that hold them.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME
from transformers.utils import logging as hf_logging

from ..config import Head, ModelConf, Source
from ..data import hub
from ..errors import ShrinkError
from ..models.base import BlockState
from .loading import (
    AUTO_CLASSES,
    Loaded,
    build_adapter,
    load_config,
    pretrained_folder,
    pretrained_kwargs,
)


def check_streamable(cfg: ModelConf) -> None:
    if Source(cfg.source) in (Source.tiny, Source.memory):
        what = "a tiny random model" if Source(cfg.source) == Source.tiny else "a model in memory"
        raise ShrinkError(
            f"stream=true reads blocks from safetensors shards; model {cfg.name!r} is {what} "
            "with none (valid sources: packaged, local, hub, gguf)"
        )


def model_folder(cfg: ModelConf) -> Path:
    """A local folder with the model's config and safetensors shards (a hub model's snapshot)."""
    check_streamable(cfg)
    if cfg.source != Source.hub:
        return Path(pretrained_folder(cfg))
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            cfg.path,
            revision=cfg.revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            local_files_only=not hub.reachable(),
        )
    )


class ShardReader:
    """Which shard holds each tensor (from the index, or by listing a lone file's keys)."""

    def __init__(self, folder: Path) -> None:
        index = folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as shard:
                    self.files |= dict.fromkeys(shard.keys(), file)
        if not self.files:
            raise ShrinkError(f"{str(folder)!r} has no safetensors weights to stream blocks from")

    def resolve(self, name: str, base_prefix: str) -> str:
        """The checkpoint's name for model tensor `name`: the same, or without / with the base
        model's prefix (checkpoints saved from the bare backbone), or a legacy LayerNorm name."""
        stem = name.removeprefix(base_prefix + ".")
        candidates = [name, stem, f"{base_prefix}.{name}"]
        for old, new in ((".weight", ".gamma"), (".bias", ".beta")):
            if "LayerNorm" in name and name.endswith(old):
                candidates += [c.removesuffix(old) + new for c in candidates]
        for candidate in candidates:
            if candidate in self.files:
                return candidate
        raise ShrinkError(f"tensor {name!r} is in no safetensors shard (tried {', '.join(candidates)})")

    def read(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """{key: tensor} for {key: checkpoint name}, each shard opened once."""
        by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for key, name in names.items():
            by_file[self.files[name]].append((key, name))
        out: dict[str, torch.Tensor] = {}
        for file, pairs in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                out |= {key: shard.get_tensor(name) for key, name in pairs}
        return out


def load_streamed(cfg: ModelConf, dtype: torch.dtype) -> tuple[Loaded, BlockState]:
    """The model with its blocks on the meta device, and `fetch(i)`: block i's tensors from the
    shards, under the block's own (relative) names."""
    config = load_config(cfg)
    folder = model_folder(cfg)
    auto = AUTO_CLASSES[Head(cfg.head)]
    n_layers = config.num_hidden_layers
    shell = copy.deepcopy(config)
    shell.num_hidden_layers = 0
    if getattr(shell, "layer_types", None) is not None:
        shell.layer_types = []
    kw = pretrained_kwargs(cfg) | {"local_files_only": True}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists every block tensor as unexpected
    try:
        model = auto.from_pretrained(str(folder), config=shell, dtype=dtype, use_safetensors=True, **kw)
    except OSError as err:
        raise ShrinkError(f"model {cfg.name!r}: no safetensors weights in {str(folder)!r} ({err})") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    with torch.device("meta"):
        skeleton = auto.from_config(config, dtype=dtype)
    adapter = build_adapter(model)
    adapter.blocks().extend(build_adapter(skeleton).blocks())
    model.config.num_hidden_layers = n_layers  # the loaded modules share this (copied) config
    if getattr(config, "layer_types", None) is not None:
        model.config.layer_types = config.layer_types
    model.eval()
    model.requires_grad_(False)
    reader = ShardReader(folder)
    base_prefix = model.base_model_prefix

    def fetch(index: int) -> dict[str, torch.Tensor]:
        block = adapter.blocks()[index]
        prefix = adapter.block_path(index) + "."
        return reader.read({key: reader.resolve(prefix + key, base_prefix) for key in block.state_dict()})

    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kw)
    return Loaded(model, tokenizer, adapter), fetch
