"""Models spread over devices by accelerate while loading (`model.device_map`).

accelerate hooks every module: the hook moves the module's inputs to its execution device and,
for a module offloaded to the CPU or disk, reads its weights from a `weights_map` before each
forward and drops them after. The layer-wise runner instead works on one block at a time without
those hooks: `Mapped.enter` reads the block's offloaded tensors onto its execution device and
`leave` puts hooks back. A block that came back unchanged (the profiling pass) returns to its
offload as it was; an edited block has new modules and tensors that no `weights_map` holds, so
it gets one block-level hook: on its device, or, if it was offloaded to feed an accelerator,
kept compressed in CPU memory and brought to that accelerator for each forward. Modules outside
the blocks (embeddings, final norm, head) are read in once after loading: every forward needs
them, and they are small next to the blocks.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import named_module_tensors, set_module_tensor_to_device
from omegaconf import OmegaConf
from torch import nn

from ..errors import ShrinkError
from ..hardware.memory import release_freed_memory

if TYPE_CHECKING:  # models/loading.py imports this module
    from .base import Adapter

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_names() -> str:
    gpus = [f"{i} / cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ", ".join(["cpu", "disk", *gpus])


def _check_device(value: Any, where: str) -> None:
    text = str(value)
    if text in ("cpu", "disk"):
        return
    index = text.removeprefix("cuda:")
    if index.isdigit() and torch.cuda.is_available() and int(index) < torch.cuda.device_count():
        return
    raise ShrinkError(f"{where}: device {value!r} is not a device here; valid: {_device_names()}")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def check_device_map(model_cfg: Any) -> None:
    """Cheap checks of `model.device_map` / `model.max_memory`, before anything is loaded."""
    device_map, max_memory = _plain(model_cfg.device_map), _plain(model_cfg.max_memory)
    if device_map is None:
        if max_memory is not None:
            raise ShrinkError(
                "model.max_memory applies with model.device_map only; set model.device_map=auto"
            )
        return
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise ShrinkError(
                f"model.device_map={device_map!r} is not a strategy; valid: {', '.join(STRATEGIES)}, "
                "or a dict of module path -> device"
            )
    elif isinstance(device_map, dict):
        for module, device in device_map.items():
            _check_device(device, f"model.device_map[{module!r}]")
    else:
        raise ShrinkError(f"model.device_map={device_map!r} must be a strategy name or a dict")
    if max_memory is not None and not isinstance(max_memory, dict):
        raise ShrinkError(
            f"model.max_memory={max_memory!r} must be a dict of device -> size, e.g. {{cpu: 2GiB}}"
        )
    for device in max_memory or {}:
        _check_device(device, "model.max_memory")


def check_block_map(model_cfg: Any, skeleton: Adapter) -> None:
    """A dict device map must keep each block whole: checked on the architecture built on the
    meta device (no weights), before loading."""
    device_map = _plain(model_cfg.device_map)
    if isinstance(device_map, dict):
        block_homes(device_map, skeleton)


def loading_kwargs(model_cfg: Any, offload_folder: str | Path) -> dict[str, Any]:
    """from_pretrained's arguments for a device map (accelerate wants GPU indices as ints)."""

    def device(value: Any) -> Any:
        return int(value) if str(value).isdigit() else value

    device_map, max_memory = _plain(model_cfg.device_map), _plain(model_cfg.max_memory)
    if isinstance(device_map, dict):
        device_map = {module: device(d) for module, d in device_map.items()}
    memory = {device(d): size for d, size in max_memory.items()} if max_memory else None
    return {"device_map": device_map, "max_memory": memory, "offload_folder": str(offload_folder)}


def is_mapped(model: nn.Module) -> bool:
    return getattr(model, "hf_device_map", None) is not None


def _align_hooks(module: nn.Module) -> Iterator[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    for h in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
        if isinstance(h, AlignDevicesHook):
            yield h


def _offloaded_tensors(module: nn.Module, hook: AlignDevicesHook) -> Iterator[str]:
    for name, _ in named_module_tensors(
        module,
        include_buffers=hook.offload_buffers,
        recurse=hook.place_submodules,
        remove_non_persistent=True,
    ):
        yield name


def _onload_own(module: nn.Module) -> list[tuple[nn.Module, AlignDevicesHook]]:
    """Read the tensors that `module`'s own hooks offload onto their execution device and turn
    that offloading off; returns what was switched, so `_offload_again` can undo it."""
    switched = []
    for hook in _align_hooks(module):
        if hook.offload:
            for name in _offloaded_tensors(module, hook):
                if name in hook.weights_map:  # a tied tensor is stored under its other name
                    value = hook.weights_map[name]
                    set_module_tensor_to_device(module, name, hook.execution_device, value=value)
            hook.offload = False
            switched.append((module, hook))
    return switched


def _offload_again(switched: list[tuple[nn.Module, AlignDevicesHook]]) -> None:
    for module, hook in switched:
        for name in _offloaded_tensors(module, hook):
            if name in hook.weights_map:  # what `_onload_own` read in, and nothing else
                set_module_tensor_to_device(module, name, "meta")
        hook.offload = True


def onload_outside_blocks(model: nn.Module, adapter: Adapter) -> None:
    """Read every offloaded module outside the blocks onto its execution device, for good."""
    inside = {id(m) for block in adapter.blocks() for m in block.modules()}
    outside = [m for m in model.modules() if id(m) not in inside]
    for module in outside:
        _onload_own(module)
    model.tie_weights()  # a tied head whose weights_map lacks the shared tensor gets it again
    empty = [n for m in outside for n, t in named_module_tensors(m) if t.is_meta]
    if empty:
        raise ShrinkError(f"the device map left {', '.join(empty[:3])} outside the blocks on no device")


def block_homes(device_map: dict[str, Any], adapter: Adapter) -> list[str]:
    """Each block's device in a device map ("0", "cuda:1", "cpu", "disk"); a block that the map
    splits over several devices is refused (the runner edits a block on one device)."""
    device_map = {k: str(v) for k, v in device_map.items()}
    homes = []
    for index in range(len(adapter.blocks())):
        path = adapter.block_path(index)
        inner = {d for k, d in device_map.items() if k.startswith(path + ".")}
        outer = [k for k in device_map if k in ("", path) or path.startswith(k + ".")]
        found = inner | ({device_map[max(outer, key=len)]} if outer else set())
        if len(found) != 1:
            raise ShrinkError(
                f"the device map puts block {index} ({path}) on {sorted(found) or 'no device'}; "
                "map whole blocks to one device each (device_map=auto does)"
            )
        homes.append(found.pop())
    return homes


def _execution_device(block: nn.Module, home: str) -> torch.device:
    for module in block.modules():
        for hook in _align_hooks(module):
            if hook.execution_device is not None:
                device = hook.execution_device
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device(f"cuda:{home}" if home.isdigit() else "cpu" if home == "disk" else home)


def _tensors(block: nn.Module) -> list[weakref.ref]:
    return [weakref.ref(t) for t in chain(block.parameters(), block.buffers())]


@dataclass
class Mapped:
    """The placement of a device-mapped model: block i runs on `devices[i]`; `homes[i]` is its
    entry in the device map ("cpu" or "disk" when accelerate keeps it off that device between uses)."""

    blocks: list[nn.Module]
    devices: list[torch.device]
    homes: list[str]
    _entered: dict[int, tuple[list[weakref.ref], list]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, adapter: Adapter) -> Mapped:
        homes = block_homes(model.hf_device_map, adapter)
        blocks = list(adapter.blocks())
        devices = [_execution_device(b, home) for b, home in zip(blocks, homes, strict=True)]
        return cls(blocks, devices, homes)

    def summary(self) -> dict[str, int]:
        """How many blocks the map put on each device (for metrics.json)."""
        return dict(Counter(f"cuda:{h}" if h.isdigit() else h for h in self.homes))

    def device_for(self, index: int) -> torch.device:
        return self.devices[index]

    def enter(self, index: int, block: nn.Module) -> None:
        switched = [pair for module in block.modules() for pair in _onload_own(module)]
        self._entered[index] = (_tensors(block), switched)

    def leave(self, index: int, block: nn.Module) -> None:
        before, switched = self._entered.pop(index)
        now = list(chain(block.parameters(), block.buffers()))
        if len(now) == len(before) and all(ref() is t for ref, t in zip(before, now, strict=True)):
            _offload_again(switched)  # unchanged: back where accelerate had it
        else:
            remove_hook_from_module(block, recurse=True)
            device = self.devices[index]
            keep_off = self.homes[index] in ("cpu", "disk") and device.type != "cpu"
            if keep_off:
                block.to("cpu")
            hook = AlignDevicesHook(execution_device=device, offload=keep_off, place_submodules=True)
            add_hook_to_module(block, hook)
        release_freed_memory()

    def state(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors on the CPU (block-relative names), offloaded ones included:
        the store `checkpoint.save` writes the blocks from."""
        block, offloaded = self.blocks[index], {}
        for prefix, module in block.named_modules():
            for hook in _align_hooks(module):
                if hook.offload:
                    for name in _offloaded_tensors(module, hook):
                        offloaded[f"{prefix}.{name}" if prefix else name] = hook.weights_map[name]
        state = {}
        for name, tensor in block.state_dict().items():
            if tensor.is_meta and name not in offloaded:
                raise ShrinkError(f"block {index}: tensor {name} is on no device and in no offload store")
            state[name] = (offloaded[name] if tensor.is_meta else tensor).detach().to("cpu")
        return state
