"""The layers and structure edits of shrink's compressed models, self-contained (torch and
transformers only, with `modeling_shrink_attention.py` beside it): shrink builds its models from
these classes, and copies both files into a checkpoint whose structure transformers cannot build
from a config, so that `AutoModel*.from_pretrained(folder, trust_remote_code=True)` loads it
without shrink.

The checkpoint's config.json names a class `Shrink<Base>` (e.g. `ShrinkLlamaForCausalLM`) in its
`auto_map`; this module makes it on request: the base transformers class, whose `__init__` then
applies the edits listed in `config.shrink_edits` (factor pairs, resized linears, thinned heads,
corrected linears, head counts, packed linears, attention at thinned widths), so the per-layer
shapes live in the config, not in code. Its config is `Shrink<BaseConfig>`, of model type
`shrink_<base type>`: a model type transformers does not know, so that loading the folder without
`trust_remote_code=True` fails with transformers' own message asking for it, instead of building
the base class, whose weights do not fit (a silently re-initialised model, or a long size-mismatch
report). A packed linear keeps compressed-tensors' tensors as they are stored and unpacks its
weight before its first forward (torch only: the layout is read back here, not imported)."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F

from .modeling_shrink_attention import padded_attention, thin_attention  # noqa: F401  (apply_edit, callers)

MODELING_VERSION = 2  # 2: the config has a model type of its own (shrink_<base>)
MODEL_TYPE_PREFIX = "shrink_"
# what a checkpoint carries beside its weights (this file imports the second)
MODELING_FILES = ("modeling_shrink.py", "modeling_shrink_attention.py")


class LowRankLinear(nn.Module):
    """y = second(first(x)): a rank-r factor pair standing in for an out×in Linear.

    Costs r·(in+out) weights (+ the bias), so it is only worth it when r < in·out/(in+out).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, **factory)
        self.second = nn.Linear(rank, out_features, bias=bias, **factory)

    @classmethod
    def from_factors(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear
    ) -> LowRankLinear:
        """left: out×r, right: r×in, so that W ≈ left @ right; dtype/device follow `like`."""
        dtype, device = like.weight.dtype, like.weight.device
        module = cls(
            right.shape[1], left.shape[0], right.shape[0], bias=bias is not None, dtype=dtype, device=device
        )
        with torch.no_grad():
            module.first.weight.copy_(right)
            module.second.weight.copy_(left)
            if bias is not None:
                module.second.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class HeadPaddedLinear(nn.Linear):
    """A projection whose `heads` heads keep `width` < `head_dim` dimensions: it stores and computes
    heads·width outputs and pads each head with zeros to `head_dim`, so the family's own attention
    code (which views heads at the query/key head size) runs unchanged.

    Values keep the first `width` places of each head (the zeros reach only the output projection's
    dropped inputs, a `HeadSlicedLinear`). Queries and keys keep `positions` (heads × width), the
    places of the dims they kept: a rotary pair turns at the frequency of its place, and zeros add
    nothing to q·k (a zero pair stays zero under rotation).

    In a thin attention (`thin`, set by `thin_attention`) it pads nothing: the attention computes
    at `width`."""

    thin = False

    def __init__(
        self,
        in_features: int,
        heads: int,
        width: int,
        head_dim: int,
        bias: bool = True,
        positions: torch.Tensor | None = None,
        **factory,
    ) -> None:
        super().__init__(in_features, heads * width, bias=bias, **factory)
        self.heads, self.width, self.head_dim = heads, width, head_dim
        self.positions: torch.Tensor | None = None
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.long, device="cpu")
            if positions.shape != (heads, width):
                raise ValueError(f"positions of shape {tuple(positions.shape)}; expected ({heads}, {width})")
            self.positions = positions
        self._places: dict[torch.device, torch.Tensor] = {}  # the flat places, per device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(super().forward(x))

    def pad(self, y: torch.Tensor) -> torch.Tensor:
        """Its heads·width outputs placed in the zero-padded heads (what an adapter's update of
        its stored rows goes through too); unchanged in a thin attention."""
        if self.thin:
            return y
        if self.positions is None:
            return F.pad(y.unflatten(-1, (self.heads, self.width)), (0, self.head_dim - self.width)).flatten(
                -2
            )
        out = y.new_zeros(*y.shape[:-1], self.heads * self.head_dim)
        return out.index_copy_(-1, self.places(y.device), y)

    def places(self, device: torch.device) -> torch.Tensor:
        """Where its outputs go in the padded heads (computed once per device, from `positions`,
        so building the module on the meta device loses nothing)."""
        assert self.positions is not None
        if device not in self._places:
            self._places[device] = head_places(self.positions, self.head_dim).to(device)
        return self._places[device]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, width={self.width}, head_dim={self.head_dim}"


class HeadSlicedLinear(nn.Linear):
    """An output projection that reads only the first `width` of each of `heads` head slices of
    size `head_dim` (the dimensions a `HeadPaddedLinear` value projection keeps); in a thin
    attention (`thin`) its input is only those."""

    thin = False

    def __init__(
        self, heads: int, width: int, head_dim: int, out_features: int, bias: bool = True, **factory
    ) -> None:
        super().__init__(heads * width, out_features, bias=bias, **factory)
        self.heads, self.width, self.head_dim = heads, width, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.select(x))

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The part of its input it reads: the first `width` of each head slice."""
        if self.thin:
            return x
        return x.unflatten(-1, (self.heads, self.head_dim))[..., : self.width].flatten(-2)

    def input_places(self) -> torch.Tensor:
        """Where in its input (head_dim wide per head, or only its columns when thin) the columns it
        reads lie."""
        if self.thin:
            return torch.arange(self.in_features)
        return head_places(torch.arange(self.width).repeat(self.heads, 1), self.head_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, width={self.width}, head_dim={self.head_dim}"


class CorrectedLinear(nn.Module):
    """A quantized linear plus a rank-r correction of its quantization error in full precision
    (SLiM): y = base(x) + second(first(x')), x' the part of x the base reads (a thin o_proj reads
    part of its input). The base keeps its type, path suffix `.base`, and its bias."""

    def __init__(self, base: nn.Linear, rank: int, **factory) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.correction = LowRankLinear(base.in_features, base.out_features, rank, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        read = self.base.select(x) if isinstance(self.base, HeadSlicedLinear) else x
        correction = self.correction(read)
        if isinstance(self.base, HeadPaddedLinear):  # placed where the base puts its outputs
            correction = self.base.pad(correction)
        return self.base(x) + correction

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class ScaledRMSNorm(nn.Module):
    """x / sqrt(‖x‖²/mean_dim + eps), no weight: a norm that commutes with rotations of its input,
    so a rotated and sliced residual stream (SliceGPT) is normalised as the full one was. Its
    weight (and a LayerNorm's bias) live in the linears that read it. `mean_dim` stays the model's
    hidden size when the stream is sliced, so ‖x‖² of the kept directions is measured against the
    full width. `center` subtracts the mean first: a LayerNorm without its affine part, for a
    stream that is not centred yet (the raw embeddings of a LayerNorm family)."""

    def __init__(self, mean_dim: int, eps: float, center: bool = False) -> None:
        super().__init__()
        self.mean_dim, self.eps, self.center = mean_dim, eps, center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}, center={self.center}"


# a sliced block's residual maps and where it taps its own submodules (block-relative paths)
SHORTCUTS = ("attn_shortcut", "mlp_shortcut")
TAPS = "shrink_taps"


def add_shortcuts(
    block: nn.Module, taps: dict[str, str], d_in: int, d_mid: int, d_out: int, **factory: Any
) -> None:
    """Give a pre-norm block SliceGPT's shortcut matrices: its residual stream enters `d_in` wide,
    is `d_mid` wide between attention and MLP and leaves `d_out` wide, each in a basis of its own,
    so the skip connections carry the stream through `attn_shortcut` (d_in→d_mid) and
    `mlp_shortcut` (d_mid→d_out) instead of adding it as it is:

        h = x·Q_attn + attention(norm₁(x)),   y = h·Q_mlp + mlp(norm₂(h)).

    The family's own block code runs unchanged; hooks route the stream (`taps`: the paths of
    `attn_norm`, `attn` and `mlp_norm`). The block is handed zeros of its output width in place of
    x, so each of its residual additions adds the exact sum the hooks computed to zeros (no
    subtraction of x, no rounding beyond the shortcut's own). Built again on an existing block it
    only resizes the maps."""
    for name, (rows, cols) in zip(SHORTCUTS, ((d_mid, d_in), (d_out, d_mid)), strict=True):
        setattr(block, name, nn.Linear(cols, rows, bias=False, **factory))
    if getattr(block, TAPS, None) is None:
        block.register_forward_pre_hook(_enter_sliced, with_kwargs=True)
        block.register_forward_hook(_leave_sliced)
        block.get_submodule(taps["attn_norm"]).register_forward_hook(_attn_norm_output)
        block.get_submodule(taps["attn"]).register_forward_hook(_attention_output)
        block.get_submodule(taps["mlp_norm"]).register_forward_hook(_mlp_norm_output)
    setattr(block, TAPS, dict(taps))


def _enter_sliced(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x = args[0] if args else kwargs["hidden_states"]
    stash = {"x": x, "block": block}
    for path in getattr(block, TAPS).values():
        block.get_submodule(path)._shrink_stash = stash
    zeros = x.new_zeros(*x.shape[:-1], block.mlp_shortcut.out_features)
    if args:
        return (zeros, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": zeros}


def _leave_sliced(block: nn.Module, args: tuple, output: Any) -> None:
    for path in getattr(block, TAPS).values():
        block.get_submodule(path)._shrink_stash = None


def _attn_norm_output(norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return norm.forward(norm._shrink_stash["x"])  # the real stream, not the zeros the block got


def _attention_output(attention: nn.Module, args: tuple, output: Any) -> Any:
    stash = attention._shrink_stash
    block = stash["block"]
    found = output[0] if isinstance(output, tuple) else output
    stash["h"] = block.attn_shortcut(stash["x"]) + found
    carried = block.mlp_shortcut(stash["h"])  # the block adds it to zeros: y's skip term
    return (carried, *output[1:]) if isinstance(output, tuple) else carried


def _mlp_norm_output(norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    y = norm.forward(norm._shrink_stash["h"])
    return y.reshape(*args[0].shape[:-1], y.shape[-1])  # OPT flattens the tokens before its MLP


def head_places(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Flat indices of per-head `positions` (heads × width) in a heads·head_dim vector."""
    return (positions + head_dim * torch.arange(positions.shape[0])[:, None]).flatten()


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted `path` for `new` and return the old one."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized layout read back: along the last dimension, element i of
    `count` sits at bit i·bits of the little-endian int32 words, stored with an offset of
    2^(bits−1); returns the signed integers (int64)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)  # a word past the end
    start = torch.arange(count, device=packed.device) * bits
    word, offset = start // 32, start % 32
    pair = words[..., word] | ((words[..., word + 1] & 0xFF) << 32)  # a value spans two words at most
    return ((pair >> offset) & ((1 << bits) - 1)) - (1 << (bits - 1))


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A packed linear's weight: (q − zero point)·scale per row and group of input columns."""
    out_features, in_features = (int(v) for v in module.weight_shape)
    bits, scale = module.quant_bits, module.weight_scale
    q = unpack_int32(module.weight_packed, bits, in_features)
    group = in_features // scale.shape[-1]
    if hasattr(module, "weight_zero_point"):
        zero = unpack_int32(module.weight_zero_point.transpose(0, 1), bits, out_features).transpose(0, 1)
        q = q - zero.repeat_interleave(group, dim=1)
    return (q.to(scale.dtype) * scale.repeat_interleave(group, dim=1)).contiguous()


def _unpack_before_forward(module: nn.Module, args: Any) -> None:
    """Give a packed linear its dequantized weight once (again after it moves device or dtype)."""
    key = (module.weight_packed.device, module.weight_scale.dtype, module.weight_packed.data_ptr())
    if getattr(module, "_unpacked_for", None) != key:
        module.weight = dequantized_weight(module)
        module._unpacked_for = key


def make_packed(module: nn.Module, groups: int, zero_point: bool, bits: int, **factory: Any) -> None:
    """Turn a linear into one that holds compressed-tensors' packed tensors (`weight_packed`,
    `weight_scale`, `weight_shape`, packed `weight_zero_point`) and unpacks its weight before its
    first forward: what transformers loads of a packed checkpoint of a structure it cannot build."""
    out_features, in_features = module.out_features, module.in_features
    dtype, device = factory.get("dtype"), factory.get("device")
    del module.weight
    module.quant_bits = bits
    words = -(-in_features * bits // 32)
    module.register_buffer(
        "weight_packed", torch.zeros(out_features, words, dtype=torch.int32, device=device)
    )
    module.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
    module.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
    if zero_point:
        rows = -(-out_features * bits // 32)
        module.register_buffer(
            "weight_zero_point", torch.zeros(rows, groups, dtype=torch.int32, device=device)
        )
    module.register_forward_pre_hook(_unpack_before_forward)


def apply_edit(model: nn.Module, edit: dict[str, Any], **factory: Any) -> None:
    """Rebuild one structure edit of a checkpoint's manifest (`factory`: dtype, device)."""
    kind = edit["kind"]
    if kind == "quantized":
        module = model.get_submodule(edit["path"])
        make_packed(module, edit["groups"], edit["zero_point"], edit["bits"], **factory)
        return
    if kind == "attr":
        setattr(model.get_submodule(edit["path"]), edit["name"], edit["value"])
        return
    if kind == "shortcuts":
        block = model.get_submodule(edit["path"])
        add_shortcuts(block, edit["taps"], edit["in"], edit["mid"], edit["out"], **factory)
        return
    if kind == "embedding_dim":  # a narrower residual stream from the start (SliceGPT)
        module = model.get_submodule(edit["path"])
        module.weight = nn.Parameter(torch.empty(module.num_embeddings, edit["dim"], **factory))
        module.embedding_dim = edit["dim"]
        return
    if kind == "scaled_rms":
        new_norm = ScaledRMSNorm(edit["mean_dim"], edit["eps"], edit.get("center", False))
        replace_submodule(model, edit["path"], new_norm)
        return
    if kind == "thin_attention":
        thin_attention(model.get_submodule(edit["path"]), edit["style"], edit["names"])
        return
    if kind == "corrected":
        base = model.get_submodule(edit["path"])
        replace_submodule(model, edit["path"], CorrectedLinear(base, edit["rank"], **factory))
        return
    if kind == "low_rank":
        new: nn.Module = LowRankLinear(edit["in"], edit["out"], edit["rank"], bias=edit["bias"], **factory)
    elif kind == "linear":
        new = nn.Linear(edit["in"], edit["out"], bias=edit["bias"], **factory)
    elif kind == "head_padded":
        new = HeadPaddedLinear(
            edit["in"], edit["heads"], edit["width"], edit["head_dim"], edit["bias"], edit.get("positions"),
            **factory,
        )  # fmt: skip
    elif kind == "head_sliced":
        new = HeadSlicedLinear(
            edit["heads"], edit["width"], edit["head_dim"], edit["out"], bias=edit["bias"], **factory
        )
    else:
        raise ValueError(
            f"unknown edit kind {kind!r}; valid: low_rank, linear, head_padded, head_sliced, attr, "
            "corrected, quantized, shortcuts, scaled_rms, embedding_dim, thin_attention"
        )
    replace_submodule(model, edit["path"], new)


def shrunk_config(base_name: str) -> type:
    """`Shrink<base_name>`: the transformers config class `base_name` under the model type
    `shrink_<its type>`, which only this file builds."""
    base = getattr(transformers, base_name)
    name = f"Shrink{base_name}"
    attributes = {"model_type": MODEL_TYPE_PREFIX + base.model_type, "__module__": __name__}
    return type(name, (base,), {**attributes, "__qualname__": name})


def shrunk_class(base_name: str) -> type:
    """`Shrink<base_name>`: the transformers class `base_name` with the config's edits applied."""
    base = getattr(transformers, base_name)

    def __init__(self, config, *args, **kwargs):  # noqa: N807
        base.__init__(self, config, *args, **kwargs)
        dtype = next(self.parameters()).dtype
        for edit in getattr(config, "shrink_edits", None) or []:
            apply_edit(self, edit, dtype=dtype)

    name = f"Shrink{base_name}"
    attributes = {"__init__": __init__, "__module__": __name__, "__qualname__": name}
    attributes["config_class"] = _shrunk(f"Shrink{base.config_class.__name__}")
    return type(name, (base,), attributes)


def _shrunk(name: str) -> type:
    """The `Shrink<Base>` class `name` (a model or a config), made once."""
    if name not in globals():
        base = name.removeprefix("Shrink")
        make = shrunk_config if base.endswith("Config") else shrunk_class
        globals()[name] = make(base)
    return globals()[name]


def __getattr__(name: str) -> type:
    """`Shrink<Base>` classes on request (what a checkpoint's auto_map names)."""
    if name.startswith("Shrink") and hasattr(transformers, name.removeprefix("Shrink")):
        return _shrunk(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
