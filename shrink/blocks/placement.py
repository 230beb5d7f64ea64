"""Where a block's weights are while the layer-wise runner works on it.

`OnDevice`: the whole model is loaded; on an accelerator only the current block is moved there
(and back to the CPU after), so device memory holds one block plus what lies outside the blocks.
`Streamed` (`stream=true`): the blocks sit on the meta device, holding no memory; `enter` reads one
block's tensors from a store (the model's safetensors shards, or a run's finished block files) and
`leave` drops them again, so host memory holds one block at a time as well. `Mapped`
(`models/device_map.py`): accelerate spread the model over devices while loading; each block is
worked on where it was put.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..errors import ShrinkError
from ..hardware.memory import release_freed_memory
from ..models.base import BlockState

if TYPE_CHECKING:
    from ..models import Adapter


class Placement(Protocol):
    def device_for(self, index: int) -> torch.device: ...  # where block `index` runs

    def enter(self, index: int, block: nn.Module) -> None: ...

    def leave(self, index: int, block: nn.Module) -> None: ...


@dataclass
class OnDevice:
    device: torch.device

    def device_for(self, index: int) -> torch.device:
        return self.device

    def enter(self, index: int, block: nn.Module) -> None:
        if self.device.type != "cpu":
            block.to(self.device)

    def leave(self, index: int, block: nn.Module) -> None:
        if self.device.type != "cpu":
            block.to("cpu")


@dataclass
class Streamed:
    fetch: BlockState
    device: torch.device
    dtype: torch.dtype

    def device_for(self, index: int) -> torch.device:
        return self.device

    def enter(self, index: int, block: nn.Module) -> None:
        state = {
            name: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
            for name, t in self.fetch(index).items()
        }
        result = block.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ShrinkError(
                f"block {index}: the stored tensors do not match the block (missing "
                f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
        empty = [n for n, t in chain(block.named_parameters(), block.named_buffers()) if t.is_meta]
        if empty:
            raise ShrinkError(
                f"block {index} has tensors that no checkpoint holds ({', '.join(empty[:3])}); "
                "stream=true cannot rebuild them: use stream=false"
            )

    def leave(self, index: int, block: nn.Module) -> None:
        block.to("meta")
        release_freed_memory()


def place_except_blocks(adapter: Adapter, device: torch.device) -> None:
    """Move every parameter and buffer outside the blocks (embeddings, final norm, head, rotary
    tables) to `device` and leave the blocks where they are (the CPU), so that the layer-wise
    runner can bring one block at a time to an accelerator. Tied tensors move once."""
    inside = {id(t) for block in adapter.blocks() for t in [*block.parameters(), *block.buffers()]}
    moved: dict[int, torch.Tensor] = {}  # one new tensor per old one keeps tied weights tied
    for module in adapter.model.modules():
        for table, make in ((module._parameters, _as_parameter), (module._buffers, lambda t, _: t)):
            for name, tensor in list(table.items()):
                if tensor is not None and id(tensor) not in inside:
                    if id(tensor) not in moved:
                        moved[id(tensor)] = make(tensor.detach().to(device), tensor)
                    table[name] = moved[id(tensor)]


def _as_parameter(tensor: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=like.requires_grad)
