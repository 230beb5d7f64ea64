"""The layers and structure edits of shrink's compressed models, self-contained (torch and
transformers only): shrink builds its models from these classes, and copies this file into a
checkpoint whose structure transformers cannot build from a config, so that
`AutoModel*.from_pretrained(folder, trust_remote_code=True)` loads it without shrink.

The checkpoint's config.json names a class `Shrink<Base>` (e.g. `ShrinkLlamaForCausalLM`) in its
`auto_map`; this module makes it on request: the base transformers class, whose `__init__` then
applies the edits listed in `config.shrink_edits` (factor pairs, resized linears, thinned heads,
corrected linears, head counts), so the per-layer shapes live in the config, not in code.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F

MODELING_VERSION = 1


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
        self._places: dict[torch.device, torch.Tensor] = {}  # the flat places, per device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
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


def apply_edit(model: nn.Module, edit: dict[str, Any], **factory: Any) -> None:
    """Rebuild one structure edit of a checkpoint's manifest (`factory`: dtype, device)."""
    kind = edit["kind"]
    if kind == "attr":
        setattr(model.get_submodule(edit["path"]), edit["name"], edit["value"])
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
            f"unknown edit kind {kind!r}; valid: low_rank, linear, head_padded, head_sliced, attr, corrected"
        )
    replace_submodule(model, edit["path"], new)


def shrunk_class(base_name: str) -> type:
    """`Shrink<base_name>`: the transformers class `base_name` with the config's edits applied."""
    base = getattr(transformers, base_name)

    def __init__(self, config, *args, **kwargs):  # noqa: N807
        base.__init__(self, config, *args, **kwargs)
        dtype = next(self.parameters()).dtype
        for edit in getattr(config, "shrink_edits", None) or []:
            apply_edit(self, edit, dtype=dtype)

    name = f"Shrink{base_name}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type:
    """`Shrink<Base>` classes on request (what a checkpoint's auto_map names)."""
    if name.startswith("Shrink") and hasattr(transformers, name.removeprefix("Shrink")):
        cls = shrunk_class(name.removeprefix("Shrink"))
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
