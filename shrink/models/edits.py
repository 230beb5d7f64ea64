"""Module edits shared by every method: thinning heads, resizing linears, replacing submodules in
place. The layer classes they build (factor pairs, padded and sliced head projections, corrected
linears) are defined in `modeling_shrink`, the self-contained file a checkpoint carries."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_shrink import (  # noqa: F401  (the layers live in the file a checkpoint copies)
    CorrectedLinear,
    HeadPaddedLinear,
    HeadSlicedLinear,
    LowRankLinear,
    ScaledRMSNorm,
    head_places,
    replace_submodule,
)


def plain_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The plain linears a block linear is made of, each with its path suffix: a factor pair's two
    factors, a corrected linear's quantized base (its correction stays apart), or the linear itself."""
    if isinstance(module, LowRankLinear):
        return [(".first", module.first), (".second", module.second)]
    if isinstance(module, CorrectedLinear):
        return [(".base", module.base)]
    return [("", module)]


def thin_heads(
    block: nn.Module,
    v_path: str,
    o_path: str,
    v_rows: torch.Tensor,
    o_weight: torch.Tensor,
    o_bias: torch.Tensor | None,
    kv_heads: int,
    heads: int,
    width: int,
    head_dim: int,
) -> None:
    """Give every head `width` value dimensions: v keeps rows `v_rows` (kv_heads·width, grouped by
    KV head) and pads them back to `head_dim`; o reads the kept dims with weight `o_weight`
    (out × heads·width) and `o_bias` (else the bias it had)."""
    v, o = block.get_submodule(v_path), block.get_submodule(o_path)
    factory = {"dtype": v.weight.dtype, "device": v.weight.device}
    v_rows = v_rows.to(v.weight.device)
    new_v = HeadPaddedLinear(v.in_features, kv_heads, width, head_dim, bias=v.bias is not None, **factory)
    bias = o_bias if o_bias is not None else o.bias
    new_o = HeadSlicedLinear(heads, width, head_dim, o.out_features, bias=bias is not None, **factory)
    with torch.no_grad():
        new_v.weight.copy_(v.weight[v_rows])
        if v.bias is not None:
            new_v.bias.copy_(v.bias[v_rows])
        new_o.weight.copy_(o_weight)
        if bias is not None:
            new_o.bias.copy_(bias)
    replace_submodule(block, v_path, new_v)
    replace_submodule(block, o_path, new_o)


def thin_query_key(block: nn.Module, q_path: str, k_path: str, positions: torch.Tensor, group: int) -> None:
    """Keep query/key dims `positions` (KV heads × width, the places each KV head keeps, shared by
    its `group` query heads) in q and k, which hold whole heads now; each pads back to head_dim."""
    for path, places in ((q_path, positions.repeat_interleave(group, 0)), (k_path, positions)):
        linear = block.get_submodule(path)
        heads, width = places.shape
        head_dim = linear.out_features // heads
        rows = head_places(places, head_dim).to(linear.weight.device)
        factory = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        new = HeadPaddedLinear(
            linear.in_features, heads, width, head_dim, linear.bias is not None, places, **factory
        )
        with torch.no_grad():
            new.weight.copy_(linear.weight[rows])
            if linear.bias is not None:
                new.bias.copy_(linear.bias[rows])
        replace_submodule(block, path, new)


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear holding `weight` (out×in) and `bias`, in the dtype and device of `like`."""
    dtype, device = like.weight.dtype, like.weight.device
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=device)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def keep_outputs(block: nn.Module, path: str, rows: torch.Tensor) -> None:
    """Shrink the Linear at `path` to the output units `rows` (weight rows and bias entries)."""
    linear = block.get_submodule(path)
    rows = rows.to(linear.weight.device)
    bias = linear.bias[rows] if linear.bias is not None else None
    replace_submodule(block, path, new_linear(linear.weight[rows], bias, linear))


def set_inputs(block: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Replace the Linear at `path` by one reading fewer inputs: new out×k `weight`, and `bias`
    (a fold that carries the mean of what it dropped) or else the bias it had."""
    linear = block.get_submodule(path)
    replace_submodule(block, path, new_linear(weight, bias if bias is not None else linear.bias, linear))


def fold_norm(
    block: nn.Module, norm_path: str, readers: tuple[str, ...], mean_dim: int, center: bool
) -> None:
    """Move a norm's weight (and a LayerNorm's bias) into the linears that read it, W·diag(γ) and
    b + W·β, and put a weightless `ScaledRMSNorm` in its place: the block computes the same, and
    the norm now commutes with a rotation of its input. `center`: the stream it reads is not
    centred, so the new norm subtracts the mean as the LayerNorm did."""
    norm = block.get_submodule(norm_path)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"{norm_path}: {type(norm).__name__} is not an RMSNorm or LayerNorm with a weight")
    gamma = norm.weight.detach().to(torch.float64)
    beta = getattr(norm, "bias", None)
    for path in readers:
        linear = block.get_submodule(path)
        weight = linear.weight.detach().to(torch.float64)
        bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
        if beta is not None:
            shift = weight @ beta.detach().to(torch.float64)
            bias = shift if bias is None else bias + shift
        replace_submodule(block, path, new_linear(weight * gamma, bias, linear))
    replace_submodule(block, norm_path, ScaledRMSNorm(mean_dim, float(eps), center))


def center_outputs(block: nn.Module, path: str) -> None:
    """Make a linear's outputs zero-mean over their features (W − mean of its rows, b − mean(b)):
    what a LayerNorm downstream subtracts anyway, done before it so the stream stays centred."""
    linear = block.get_submodule(path)
    weight = linear.weight.detach().to(torch.float64)
    bias = linear.bias.detach().to(torch.float64) if linear.bias is not None else None
    weight = weight - weight.mean(0, keepdim=True)
    bias = bias - bias.mean() if bias is not None else None
    replace_submodule(block, path, new_linear(weight, bias, linear))


def rotate_inputs(block: nn.Module, path: str, basis: torch.Tensor) -> None:
    """A linear reading x·basis (basis: d × k, orthonormal columns) in place of x: W·basis."""
    linear = block.get_submodule(path)
    weight = linear.weight.detach().to(torch.float64) @ basis.to(linear.weight.device, torch.float64)
    replace_submodule(block, path, new_linear(weight, linear.bias, linear))


def rotate_outputs(block: nn.Module, path: str, basis: torch.Tensor) -> None:
    """A linear writing y·basis (basis: d × k) in place of y: basisᵀ·W and basisᵀ·b."""
    linear = block.get_submodule(path)
    basis = basis.to(linear.weight.device, torch.float64)
    weight = basis.T @ linear.weight.detach().to(torch.float64)
    bias = basis.T @ linear.bias.detach().to(torch.float64) if linear.bias is not None else None
    replace_submodule(block, path, new_linear(weight, bias, linear))
