"""The adapter interface: the only place that knows where an architecture keeps its parts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling_shrink import SHORTCUTS, TAPS, HeadPaddedLinear, HeadSlicedLinear, thin_attention
from ..modeling_shrink_attention import is_thin

BlockState = Callable[[int], dict[str, torch.Tensor]]  # block index -> its tensors, block-relative names


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


@dataclass(frozen=True)
class AttentionPaths:
    """Where a block keeps its attention projections (relative to the block)."""

    q: str
    k: str
    v: str
    o: str


@dataclass(frozen=True)
class Attention:
    """A method's handle on one block's attention: the projections by name and the head counts,
    so that no method unpacks q, k, v by position or reaches the model to change a count."""

    block: nn.Module
    paths: AttentionPaths
    head_dim: int
    causal: bool
    _set_counts: Callable[[nn.Module, int, int], None]
    # query/key dims of one head that are kept or dropped together (rotary pairs rotate as one);
    # None where q/k cannot be thinned by zero-padding (a norm over each head's q/k, as in Qwen3)
    qk_units: tuple[tuple[int, ...], ...] | None = None
    # the attention module (block-relative) where it computes at its projections' widths once they
    # are thinned; None where thinned heads stay zero-padded to head_dim
    module: str | None = None

    def linear(self, name: str) -> nn.Linear:
        """The projection `q`, `k`, `v` or `o`."""
        return self.block.get_submodule(getattr(self.paths, name))

    def counts(self) -> tuple[int, int]:
        """(query heads, KV heads) the projections hold now, read from their shapes."""
        return self._heads("q"), self._heads("k")

    def _heads(self, name: str) -> int:
        linear = self.linear(name)
        linear = getattr(linear, "base", linear)  # a corrected linear's layout is its base's
        return linear.heads if isinstance(linear, HeadPaddedLinear) else linear.out_features // self.head_dim

    def score_width(self) -> int:
        """The head size QKᵀ and A·V run at: in a thin attention the wider of the kept q/k and v
        widths (the fused kernels take one head size), head_dim where heads are padded back."""
        if self.module is None or not is_thin(self.block.get_submodule(self.module)):
            return self.head_dim
        widths = self.block.get_submodule(self.module).shrink_widths
        return max(widths["k"], widths["v"])

    def set_counts(self, n_heads: int, n_kv_heads: int) -> None:
        """Tell the attention module how many heads its (pruned) projections now hold."""
        self._set_counts(self.block, n_heads, n_kv_heads)


class Adapter(ABC):
    """Wraps one loaded model of a family; knows its blocks, sites and head structure."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    causal: bool = True
    attention_paths: AttentionPaths
    # `mlp_in` / `mlp_out` -> the MLP's linears (relative to the block) that read that input
    mlp_paths: dict[str, tuple[str, ...]] = {}
    # attention-module attributes that hold head counts: path -> attribute -> "heads" | "kv_groups"
    # | "head_width" (heads × head size); updated when heads are pruned, recorded in checkpoints
    head_attributes: dict[str, dict[str, str]] = {}
    # the config keys a stock checkpoint of uniformly thinned blocks changes: the FFN width, and
    # (None where the family derives its head size from hidden_size / heads) the head counts
    ffn_config_key: str = "intermediate_size"
    head_config_keys: dict[str, str] | None = None  # "heads" | "kv_heads" | "head_dim" -> config key
    layers_config_key: str = "num_hidden_layers"  # the config key of the block count
    # the forward of `modeling_shrink_attention` that computes this family's attention at thinned
    # widths ("rotary", "opt"); None: thinned heads are zero-padded back to head_dim
    thin_style: str | None = None
    # pre-norm blocks: the norm each residual-stream site reads through and the attention module
    # (block-relative), what a method that rotates the residual stream folds and taps; None where
    # the norms sit on the stream itself (post-norm) or blocks carry more norms than these two
    stream_paths: dict[str, str] | None = None
    # embeddings added into the residual stream besides the token embedding (OPT's learned
    # positions), relative to `model.base_model`
    extra_embeddings: tuple[str, ...] = ()
    # the norm between the last block and the LM head, relative to `model.base_model` (None: none)
    final_norm_path: str | None = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    @abstractmethod
    def _blocks_of(self, backbone: nn.Module) -> nn.ModuleList:
        """The block list, given `model.base_model` (the same for every head class)."""

    @property
    def site_paths(self) -> dict[str, tuple[str, ...]]:
        """Site name -> linears that read that site's input, in forward order."""
        a = self.attention_paths
        return {"attn_in": (a.q, a.k, a.v), "attn_out": (a.o,), **self.mlp_paths}

    def sites(self, block: nn.Module) -> list[Site]:
        """The block's linears grouped by shared input, in forward order."""
        return [Site(name, paths) for name, paths in self.site_paths.items()]

    def attention(self, block: nn.Module) -> Attention:
        return Attention(
            block,
            self.attention_paths,
            self.heads().head_dim,
            self.causal,
            self._set_head_counts,
            self.qk_units(block),
            self._attention_module() if self.thin_style is not None else None,
        )

    def _attention_module(self) -> str:
        """The attention module that holds the four projections (block-relative)."""
        return self.attention_paths.q.rpartition(".")[0]

    def qk_units(self, block: nn.Module) -> tuple[tuple[int, ...], ...] | None:
        """Query/key dims of a head that go together: each dim alone without rotary embeddings
        (q·k is a sum over dims, and a dropped dim's zero adds nothing)."""
        return tuple((i,) for i in range(self.heads().head_dim))

    def stream_taps(self) -> dict[str, str] | None:
        """`attn_norm`, `attn` and `mlp_norm` of a pre-norm block whose residual stream may be
        rotated (SliceGPT): None where this model's blocks are not of that form."""
        return dict(self.stream_paths) if self.stream_paths is not None else None

    def stream_maps(self, block: nn.Module) -> list[str]:
        """The block's residual-stream maps (shortcut matrices of a rotated stream), if any."""
        return list(SHORTCUTS) if getattr(block, TAPS, None) is not None else []

    def embeddings(self) -> list[nn.Embedding]:
        """Every embedding whose rows enter the residual stream at its start."""
        base = self.model.base_model
        return [self.model.get_input_embeddings(), *(base.get_submodule(p) for p in self.extra_embeddings)]

    def rotate_embeddings(self, basis: torch.Tensor) -> None:
        """Make the residual stream start in `basis` (d × k): every embedding row e becomes e·basis,
        k wide. A head tied to the token embedding keeps its own copy first (the config says it is
        no longer tied), so the logits stay what they were."""
        head = self.model.get_output_embeddings()
        tokens = self.model.get_input_embeddings()
        if head is not None and head.weight is tokens.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            self.config.tie_word_embeddings = False
        for embedding in self.embeddings():
            weight = embedding.weight.detach()
            rotated = weight.to(torch.float64) @ basis.to(weight.device, torch.float64)
            embedding.weight = nn.Parameter(rotated.to(weight.dtype), requires_grad=False)
            embedding.embedding_dim = basis.shape[1]

    def final_norm(self) -> nn.Module | None:
        """The norm the last block's output goes through before the LM head."""
        if self.final_norm_path is None:
            return None
        return self.model.base_model.get_submodule(self.final_norm_path)

    def hidden_size(self) -> int:
        """The residual stream's width."""
        return int(self.config.hidden_size)

    def heads(self) -> HeadLayout:
        """Multi-head attention with as many KV heads as query heads (overridden for GQA)."""
        n_heads = self.config.num_attention_heads
        return HeadLayout(n_heads, n_heads, self.config.hidden_size // n_heads)

    def _set_head_counts(self, block: nn.Module, n_heads: int, n_kv_heads: int) -> None:
        """The attention module's head counts, and its widths: once a projection is thinned it
        computes at the kept widths (where the family has a thin forward)."""
        head_dim = self.heads().head_dim
        values = {"heads": n_heads, "kv_groups": n_heads // n_kv_heads, "head_width": n_heads * head_dim}
        for path, attributes in self.head_attributes.items():
            module = block.get_submodule(path)
            for attribute, kind in attributes.items():
                setattr(module, attribute, values[kind])
        self.thin_widths(block)

    def thin_widths(self, block: nn.Module) -> bool:
        """Make the block's attention compute at its projections' widths if any is thinned and
        the family has a thin forward (`thin_style`); whether it does now."""
        if self.thin_style is None:
            return False
        a = self.attention_paths
        module = self._attention_module()
        projections = [block.get_submodule(path) for path in (a.q, a.k, a.v, a.o)]
        if not any(
            isinstance(getattr(m, "base", m), (HeadPaddedLinear, HeadSlicedLinear)) for m in projections
        ):
            return False
        names = {role: getattr(a, role).removeprefix(module + ".") for role in "qkvo"}
        thin_attention(block.get_submodule(module), self.thin_style, names)
        return True

    def blocks(self) -> nn.ModuleList:
        return self._blocks_of(self.model.base_model)

    def block_widths(self) -> list[dict[str, Any]]:
        """Per block what it kept: FFN width, query and KV heads, and the rank of each factor pair
        (for model cards and reports; shapes only, so blocks may be on the meta device)."""
        rows = []
        for block in self.blocks():
            n_heads, n_kv = self.attention(block).counts()
            ranks = {
                path: int(block.get_submodule(path).rank)
                for site in self.sites(block)
                for path in site.linears
                if hasattr(block.get_submodule(path), "first")  # a factor pair
            }
            ffn = int(block.get_submodule(self.mlp_paths["mlp_out"][0]).in_features)
            row = {"ffn": ffn, "heads": n_heads, "kv_heads": n_kv, "ranks": ranks}
            if self.stream_maps(block):  # the stream's widths in, between, out
                attn, mlp = (block.get_submodule(name) for name in SHORTCUTS)
                row["stream"] = [int(attn.in_features), int(attn.out_features), int(mlp.out_features)]
            rows.append(row)
        return rows

    def stock_config(self) -> dict[str, int] | None:
        """The config values under which the family's own code builds these blocks as they are now,
        or None: every block must keep the same FFN width and head counts in plain linears, and
        changed head counts need a family whose head size is a config key of its own."""
        shapes = set()
        for block in self.blocks():
            if self.stream_maps(block):  # a rotated, sliced residual stream
                return None
            linears = [block.get_submodule(path) for site in self.sites(block) for path in site.linears]
            if any(type(linear) is not nn.Linear for linear in linears):
                return None
            ffn = block.get_submodule(self.mlp_paths["mlp_out"][0]).in_features
            shapes.add((ffn, self.attention(block).counts()))
        if len(shapes) != 1:
            return None
        ((ffn, (n_heads, n_kv)),) = shapes
        dense = self.heads()
        values = {self.ffn_config_key: ffn}
        if (n_heads, n_kv) != (dense.n_heads, dense.n_kv_heads):
            if self.head_config_keys is None:
                return None
            kept = {"heads": n_heads, "kv_heads": n_kv, "head_dim": dense.head_dim}
            values |= {key: kept[kind] for kind, key in self.head_config_keys.items()}
        return values

    def remove_blocks(self, indices: list[int]) -> None:
        """Delete whole blocks: the block list, the config's block count (and per-layer types) and
        every module's `layer_idx` (what KV caches are indexed by) follow, so the model is the
        family's own architecture with fewer layers."""
        gone = set(indices)
        blocks = self.blocks()
        for index in sorted(gone, reverse=True):
            del blocks[index]
        for new, block in enumerate(blocks):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
        setattr(self.config, self.layers_config_key, len(blocks))
        types = getattr(self.config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(blocks) + len(gone):
            self.config.layer_types = [t for i, t in enumerate(types) if i not in gone]

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
