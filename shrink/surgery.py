"""Module edits shared by every method: low-rank pairs and replacing submodules in place."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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
    nothing to q·k (a zero pair stays zero under rotation)."""

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
            self.register_buffer("_places", head_places(positions, head_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.positions is None:
            return F.pad(y.unflatten(-1, (self.heads, self.width)), (0, self.head_dim - self.width)).flatten(
                -2
            )
        out = y.new_zeros(*y.shape[:-1], self.heads * self.head_dim)
        return out.index_copy_(-1, self._places, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, width={self.width}, head_dim={self.head_dim}"


class HeadSlicedLinear(nn.Linear):
    """An output projection that reads only the first `width` of each of `heads` head slices of
    size `head_dim` (the dimensions a `HeadPaddedLinear` value projection keeps)."""

    def __init__(
        self, heads: int, width: int, head_dim: int, out_features: int, bias: bool = True, **factory
    ) -> None:
        super().__init__(heads * width, out_features, bias=bias, **factory)
        self.heads, self.width, self.head_dim = heads, width, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.select(x))

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """The part of its input it reads: the first `width` of each head slice."""
        return x.unflatten(-1, (self.heads, self.head_dim))[..., : self.width].flatten(-2)

    def input_places(self) -> torch.Tensor:
        """Where in its (head_dim-wide per head) input the columns it reads lie."""
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
        return self.base(x) + self.correction(read)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


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


def head_places(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Flat indices of per-head `positions` (heads × width) in a heads·head_dim vector."""
    return (positions + head_dim * torch.arange(positions.shape[0])[:, None]).flatten()


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
        new._places = new._places.to(linear.weight.device)
        replace_submodule(block, path, new)


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted `path` for `new` and return the old one."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


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
