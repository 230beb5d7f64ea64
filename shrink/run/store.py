"""Where the model's blocks live during a run, chosen once from the config: the only reader of
`stream` and `model.device_map`.

* `ResidentStore` — the model is loaded whole on the CPU; on an accelerator the runner brings one block
  at a time there, and evaluation moves the whole model.
* `ShardStore` (`stream=true`) — the blocks sit on the meta device and are read one at a time from the
  model's safetensors shards; compressed blocks go to the run's per-block checkpoints
  (`progress/`), and are read back from there to save and to evaluate, block by block.
* `Mapped` (`model.device_map`) — accelerate spread the model over devices while loading; each
  block is worked on where it was put, and the checkpoint is written from each block's tensors,
  offloaded ones included.

The pipeline asks every store the same things and never which kind it has.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..blocks import placement
from ..blocks.placement import Placement
from ..models import Adapter, Loaded, load_model
from ..models.base import BlockState
from ..models.device_map import Mapped
from ..models.streaming import load_streamed
from .progress import Progress, Restored

OFFLOAD = "offload"  # accelerate writes weights it offloads after converting them here (device_map)


class BlockStore:
    """The loaded model and where its blocks are; subclasses say how blocks come and go."""

    placement: Placement  # how the runner brings block i in and takes it out again

    def __init__(self, loaded: Loaded, device: torch.device) -> None:
        self.loaded, self.device = loaded, device

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.loaded.tokenizer

    @property
    def adapter(self) -> Adapter:
        return self.loaded.adapter

    def evaluation_blocks(self, compressed: bool) -> Placement | None:
        """Where evaluators read the blocks from, when they cannot run the model whole."""
        return None

    def ready_for_evaluation(self) -> None:
        """Put the model where evaluators run it whole (a mapped model stays where it is)."""

    def begin_compression(self) -> None:
        """Ready the model for the runner (before the profiling and compression passes)."""

    def end_compression(self) -> BlockState | None:
        """Settle the compressed model for saving; returns where to read each block's tensors
        from when the model cannot give them itself (None: its state_dict holds them)."""
        return None

    def restore(self, progress: Progress, upto: int) -> Restored:
        """Rebuild blocks 0..upto from a run's per-block checkpoints (resume=true)."""
        return progress.restore(self.model, self.adapter, upto)

    def device_summary(self) -> dict[str, int] | None:
        """Blocks per mapped device, for metrics.json (null unless mapped)."""
        return None


class ResidentStore(BlockStore):
    def __init__(self, loaded: Loaded, device: torch.device) -> None:
        super().__init__(loaded, device)
        self.placement = placement.OnDevice(device)

    def ready_for_evaluation(self) -> None:
        self.model.to(self.device)

    def begin_compression(self) -> None:
        self.model.to("cpu")  # on an accelerator only one block at a time goes there
        if self.device.type != "cpu":
            placement.place_except_blocks(self.adapter, self.device)

    def end_compression(self) -> BlockState | None:
        self.model.to("cpu")
        return None


class ShardStore(BlockStore):
    def __init__(self, model_cfg: DictConfig, device: torch.device, dtype: torch.dtype, progress: Progress):
        loaded, fetch = load_streamed(model_cfg, dtype)
        super().__init__(loaded, device)
        placement.place_except_blocks(loaded.adapter, device)
        self.placement = placement.Streamed(fetch, device, dtype)
        self.progress, self.dtype = progress, dtype

    def evaluation_blocks(self, compressed: bool) -> Placement:
        if compressed:
            return placement.Streamed(self.progress.block_state, self.device, self.dtype)
        return self.placement

    def end_compression(self) -> BlockState:
        return self.progress.block_state

    def restore(self, progress: Progress, upto: int) -> Restored:
        return progress.restore(self.model, self.adapter, upto, weights=False)  # they stay in their files


class MappedStore(BlockStore):
    def __init__(self, loaded: Loaded, device: torch.device) -> None:
        super().__init__(loaded, device)
        self.placement = self.mapped = Mapped.of(loaded.model, loaded.adapter)

    def end_compression(self) -> BlockState:
        return self.mapped.state

    def restore(self, progress: Progress, upto: int) -> Restored:
        return progress.restore(self.model, self.adapter, upto, placement=self.mapped)

    def device_summary(self) -> dict[str, Any]:
        return self.mapped.summary()


@contextmanager
def open_store(
    cfg: DictConfig, run_dir: Path, device: torch.device, dtype: torch.dtype, progress: Progress
) -> Iterator[BlockStore]:
    """Load the model the way the config asks; the offload folder accelerate may fill is removed
    when the run ends, however it ends."""
    offload = Path(run_dir) / OFFLOAD
    try:
        if cfg.stream:
            yield ShardStore(cfg.model, device, dtype, progress)
        else:
            loaded = load_model(cfg.model, dtype, seed=cfg.seed, offload_folder=offload)
            mapped = cfg.model.device_map is not None
            yield MappedStore(loaded, device) if mapped else ResidentStore(loaded, device)
    finally:
        shutil.rmtree(offload, ignore_errors=True)
