"""Attention at the widths a compressed block keeps, self-contained (torch and transformers only):
copied beside `modeling_shrink.py` into checkpoints, whose edits turn a thinned block's attention
into one of these.

A block whose values keep `w` of `head_dim` dimensions per head projects, caches and reads them at
width w, and its output projection reads heads·w; a block whose queries and keys keep `w`
dimensions projects and caches them at width w, each kept dimension rotated at the frequency of its
place in the full head. QKᵀ and A·V run at the wider of the two kept widths: the fused attention
kernels take one head size (the eager one computes each product at its own width). The scale stays
the full head's 1/√head_dim, so the logits are those of the zero-padded layers (the dropped
dimensions of q·k and of A·V were zeros).

Two forwards cover the families shrink thins: `rotary` (Llama, Mistral, Qwen2/3, Gemma 1–3: rotary
embeddings from the model, grouped-query heads, sliding windows, logit soft-capping, per-head q/k
norms when q/k keep their full width) and `opt` (learned positions, the query scaled before its
product). Each is a method of a subclass of the family's own attention class, made on first use, so
everything else (the attention kernels the config selects, the masks, the cache class) is the
family's own. A cache that allocates at the config's head size (a static cache) does not fit.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers import modeling_utils

STYLES = ("rotary", "opt")
THIN_MARK = "_shrink_thin_style"  # a class attribute of the thin subclasses


def thin_attention(attention: nn.Module, style: str, names: dict[str, str]) -> None:
    """Make `attention` (whose projections are named by `names`: q, k, v, o) compute QKᵀ and A·V
    at the widths its thinned projections keep (of `style`): its head-padded projections stop
    padding and its head-sliced output projection reads the thin heads as they come. Called again
    after a projection changes, it reads the widths anew. (Projections are told apart by what they
    carry: a head-shaped one has a `thin` switch, a padded one also its `positions`.)"""
    head_dim = int(attention.head_dim)
    widths, places = {}, None
    for role in "qkvo":
        module = _layout(attention, names[role])
        if hasattr(type(module), "thin"):
            module.thin = True
        if role == "o":
            continue
        padded = hasattr(module, "positions")
        widths[role] = module.width if padded else head_dim
        if role == "k" and padded and module.positions is not None:
            places = module.positions
    make_thin(attention, style, widths, places)
    attention.shrink_projections = dict(names)


def padded_attention(attention: nn.Module) -> None:
    """Undo `thin_attention`: the family's attention at head_dim, its thinned projections padding
    back to it (what a format that needs equal q/k/v head sizes is written from)."""
    for name in getattr(attention, "shrink_projections", {}).values():
        module = _layout(attention, name)
        if hasattr(type(module), "thin"):
            module.thin = False
    attention.__dict__.pop("shrink_projections", None)
    make_padded(attention)


def _layout(attention: nn.Module, name: str) -> nn.Module:
    """The projection whose layout counts: a corrected linear's is its base's."""
    module = attention.get_submodule(name)
    return getattr(module, "base", module)


def make_thin(attention: nn.Module, style: str, widths: dict[str, int], qk_places: Any = None) -> None:
    """Make `attention` compute at its projections' widths (`widths`: q, k, v per head; q and k
    alike) with the family's code around it. `qk_places` (KV heads × width, sorted, rotary pairs
    whole) are the places of the kept q/k dimensions in the full head, None if q/k keep all."""
    if style not in STYLES:
        raise ValueError(f"unknown thin attention style {style!r}; valid: {', '.join(STYLES)}")
    if widths["q"] != widths["k"]:
        raise ValueError(f"queries {widths['q']} and keys {widths['k']} wide: they must be alike")
    places = None if qk_places is None else torch.as_tensor(qk_places, dtype=torch.long, device="cpu")
    if places is not None and style == "rotary":
        rotary_pairs(places, int(attention.head_dim))  # refuses a split pair now, not at the forward
    base = type(attention)
    if getattr(base, THIN_MARK, None) is not None:
        base = base.__mro__[1]
    attention.__class__ = thin_class(base, style)
    attention.shrink_widths = {name: int(widths[name]) for name in "qkv"}
    attention.shrink_qk_places = places  # on the CPU even where the model is built on the meta device
    attention._shrink_rotation = {}  # per device: places, partners, signs of the kept q/k dims


def make_padded(attention: nn.Module) -> None:
    """Give a thin attention its family's own class back (it computes at head_dim again)."""
    if is_thin(attention):
        attention.__class__ = type(attention).__mro__[1]
        for name in ("shrink_widths", "shrink_qk_places", "_shrink_rotation"):
            attention.__dict__.pop(name, None)


def thin_class(base: type, style: str) -> type:
    """`Thin<Base>`: the family's attention class with the forward of `style` (made once)."""
    name = f"Thin{base.__name__}"
    made = globals().get(name)
    if made is None or made.__mro__[1] is not base:
        forward = _rotary_forward if style == "rotary" else _opt_forward
        attributes = {"forward": forward, THIN_MARK: style, "__module__": __name__, "__qualname__": name}
        made = type(name, (base,), attributes)
        globals()[name] = made
    return made


def is_thin(attention: nn.Module) -> bool:
    return getattr(type(attention), THIN_MARK, None) is not None


def kv_cache_widths(attention: nn.Module) -> tuple[int, int]:
    """(key, value) widths per head that a thin attention caches."""
    return attention.shrink_widths["k"], attention.shrink_widths["v"]


# ---- the forwards ---------------------------------------------------------------------------------
def _rotary_forward(
    self, hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    cache = _pop_cache(kwargs)
    shape = hidden_states.shape[:-1]
    q, k, v = _projections(self, hidden_states, shape)
    if getattr(self, "q_norm", None) is not None:  # full-width q/k only (a norm over each head)
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    if self.shrink_qk_places is None:
        q, k = _family(self, "apply_rotary_pos_emb")(q, k, cos, sin)
    else:
        q, k = _rotate(self, q, cos, sin, query=True), _rotate(self, k, cos, sin, query=False)
    if cache is not None:
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
        k, v = cache.update(k, v, self.layer_idx, cache_kwargs)
    extra = {}
    window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    if window is not None:
        extra["sliding_window"] = window
    if getattr(self, "attn_logit_softcapping", None) is not None:
        extra["softcap"] = self.attn_logit_softcapping
    width = v.shape[-1]
    q, k, v = _one_head_size(self, q, k, v)
    out, weights = _interface(self)(
        self, q, k, v, attention_mask,
        dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **extra, **kwargs,
    )  # fmt: skip
    return self.o_proj(out[..., :width].reshape(*shape, -1).contiguous()), weights


def _opt_forward(
    self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor | None]:
    cache = _pop_cache(kwargs)
    kwargs.pop("output_attentions", None)
    shape = hidden_states.shape[:-1]
    q, k, v = _projections(self, hidden_states, shape, query_scale=self.scaling)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, {"cache_position": kwargs.get("cache_position")})
    width = v.shape[-1]
    q, k, v = _one_head_size(self, q, k, v)
    out, weights = _interface(self)(
        self, q, k, v, attention_mask, dropout=self.dropout if self.training else 0.0, scaling=1.0, **kwargs
    )
    return self.out_proj(out[..., :width].reshape(*shape, -1).contiguous()), weights


# ---- shared parts ---------------------------------------------------------------------------------
def _projections(
    attention: nn.Module, x: torch.Tensor, shape: torch.Size, query_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (batch, heads, tokens, width), each at its own width."""
    widths = attention.shrink_widths
    q = attention.q_proj(x)
    if query_scale is not None:
        q = q * query_scale
    views = []
    for name, y in (("q", q), ("k", attention.k_proj(x)), ("v", attention.v_proj(x))):
        views.append(y.view(*shape, -1, widths[name]).transpose(1, 2))
    return views[0], views[1], views[2]


def _one_head_size(
    attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v at one head size, the wider of q/k's and v's, the narrower zero-padded (zeros add
    nothing to q·k, and A·V's extra columns are cut off after): the fused attention kernels take
    one head size (torch's CPU SDPA falls back to a path about 5× slower on two), while the eager
    kernel computes each product at its own width."""
    qk, width = q.shape[-1], v.shape[-1]
    if qk == width or attention.config._attn_implementation in (None, "eager"):
        return q, k, v
    if qk < width:
        pad = (0, width - qk)
        return nn.functional.pad(q, pad), nn.functional.pad(k, pad), v
    return q, k, nn.functional.pad(v, (0, qk - width))


def _pop_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache under whichever name this transformers version passes it."""
    found = None
    for name in ("cache", "past_key_values", "past_key_value"):
        value = kwargs.pop(name, None)
        if value is not None:
            found = value
    return found


def _family(attention: nn.Module, name: str) -> Any:
    """A function of the family's modeling module (its rotary embedding, its eager attention)."""
    return getattr(sys.modules[type(attention).__mro__[1].__module__], name)


def _interface(attention: nn.Module) -> Any:
    """The attention kernel the config selects, as the family's own forward looks it up."""
    eager = _family(attention, "eager_attention_forward")
    functions = modeling_utils.ALL_ATTENTION_FUNCTIONS
    implementation = attention.config._attn_implementation
    if hasattr(functions, "get_interface"):
        return functions.get_interface(implementation, eager)
    return eager if implementation in (None, "eager") else functions[implementation]


def _rotate(attention: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query: bool):
    """Rotary embedding of thin q or k (batch, heads, tokens, width): what the family's
    `x·cos + rotate_half(x)·sin` gives the kept dimensions of the zero-padded head, whose dropped
    dimensions are zero (a rotary pair is kept or dropped whole)."""
    places, partners, signs = _rotation(attention, x.device, query)
    cos = cos[..., places].transpose(-3, -2).to(x.dtype)  # (batch, heads, tokens, width)
    sin = sin[..., places].transpose(-3, -2).to(x.dtype)
    partner = x.gather(-1, partners.expand(*x.shape[:-1], -1)) * signs.to(x.dtype)
    return x * cos + partner * sin


def _rotation(
    attention: nn.Module, device: torch.device, query: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(places (heads, width), partner indices and signs (heads, 1, width)) of the kept q or k
    dims on `device`, made once per device from the CPU tables of `rotary_pairs`."""
    key = (device, query)
    if key not in attention._shrink_rotation:
        places, partners, signs = rotary_pairs(attention.shrink_qk_places, attention.head_dim)
        if query:  # each query head reads its KV head's dims
            group = attention.num_key_value_groups
            places, partners, signs = (t.repeat_interleave(group, 0) for t in (places, partners, signs))
        attention._shrink_rotation[key] = (
            places.to(device),
            partners[:, None, :].to(device),
            signs[:, None, :].to(device),
        )
    return attention._shrink_rotation[key]


def rotary_pairs(places: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For kept dims `places` (heads × width, sorted per head): where each one's rotary partner
    (i ± head_dim/2, which `rotate_half` mixes it with) lies among them, and its sign (−1 in the
    first half). Raises if a pair is split: its dropped half would not have been zero."""
    half = head_dim // 2
    partner_places = torch.where(places < half, places + half, places - half)
    partners = torch.searchsorted(places, partner_places).clamp(max=places.shape[1] - 1)
    if not bool((places.gather(1, partners) == partner_places).all()):
        raise ValueError("thin queries/keys must keep each rotary pair (i, i + head_dim/2) whole, sorted")
    return places, partners, torch.where(places < half, -1.0, 1.0)
