"""The adapter interface: the only place that knows where an architecture keeps its parts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Site:
    """Linears of one block that read the same input, so one second moment serves them all.

    `name` tells methods what the site is: `attn_in` (q/k/v), `attn_out` (o), `mlp_in`
    (gate/up or fc1), `mlp_out` (down or fc2). Paths are relative to the block.
    """

    name: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class HeadLayout:
    n_heads: int
    n_kv_heads: int
    head_dim: int


class Adapter(ABC):
    """Wraps one loaded model of a family; knows its blocks, sites and head structure."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    causal: bool = True
    # site name -> linears (relative to the block) that read that site's input, in forward order
    site_paths: dict[str, tuple[str, ...]] = {}
    # attention-module attributes that hold head counts: path -> attribute -> "heads" | "kv_groups"
    # | "head_width" (heads × head size); updated when heads are pruned, recorded in checkpoints
    head_attributes: dict[str, dict[str, str]] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    @abstractmethod
    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        """The block list, given `model.base_model` (the same for every head class)."""

    def sites(self, block: nn.Module) -> list[Site]:
        """The block's linears grouped by shared input, in forward order."""
        return [Site(name, paths) for name, paths in self.site_paths.items()]

    def heads(self) -> HeadLayout:
        """Multi-head attention with as many KV heads as query heads (overridden for GQA)."""
        n_heads = self.config.num_attention_heads
        return HeadLayout(n_heads, n_heads, self.config.hidden_size // n_heads)

    def set_head_counts(self, block: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        """Tell the block's attention module how many heads its (pruned) projections now hold."""
        head_dim = self.heads().head_dim
        values = {"heads": n_heads, "kv_groups": n_heads // n_kv_heads, "head_width": n_heads * head_dim}
        for path, attributes in self.head_attributes.items():
            module = block.get_submodule(path)
            for attribute, kind in attributes.items():
                setattr(module, attribute, values[kind])

    def head_counts(self, block: nn.Module) -> tuple[int, int]:
        """(query heads, KV heads) the block's projections hold now, read from their shapes."""
        head_dim = self.heads().head_dim
        q, k = (block.get_submodule(p) for p in self.site_paths["attn_in"][:2])
        return q.out_features // head_dim, k.out_features // head_dim

    def blocks(self) -> nn.ModuleList:
        return self._blocks_of(self.model.base_model)

    def block_path(self, index: int) -> str:
        """Dotted path of block `index` from the top model (for manifests and logs)."""
        target = self.blocks()[index]
        for name, module in self.model.named_modules():
            if module is target:
                return name
        raise KeyError(index)

    def forward(self, ids: torch.Tensor) -> Any:
        """The whole model on token ids, without a KV cache (encoders take no `use_cache`)."""
        if self.causal:
            return self.model(input_ids=ids, use_cache=False)
        return self.model(input_ids=ids)

    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    def run_block(
        self, block: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Run one block on cached inputs (the extra positional and keyword arguments the model
        passed it) and return its output hidden states."""
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
