"""Per-block checkpoints of an unfinished run, so `resume=true` continues after the last finished block.

After block i is compressed, `progress/` in the run folder gets the block's weights and structural
edits (`block_<i>.safetensors`, `block_<i>.json`, which also keeps its layer rows and spectra) and
the inputs of block i+1 (`inputs_<i>.safetensors`: the propagated hidden states, the dense
stream of a method that needs a teacher, and what the method carries from block to block, such as
SliceGPT's basis of the stream), then `state.json`, written last and atomically, names i
(only then are block i-1's inputs deleted). A run killed at any moment therefore resumes from a
consistent state. Resuming rebuilds the finished
blocks from their files and feeds block i+1 the saved inputs: the masks and position arguments are
caught again (deterministic), the plan is made again from the same config, and every later block
sees exactly what it would have seen, so the result equals an uninterrupted run's bit for bit.
The folder is removed once the run has written its `metrics.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..blocks.placement import Placement
from ..checkpoints.save_load import apply_edit, reference_modules, structural_edits
from ..errors import ShrinkError
from ..models import Adapter
from .identity import differences

FOLDER = "progress"
Record = tuple[list[dict[str, Any]], dict[str, np.ndarray]]  # a finished block's layer rows, spectra
Streams = list[torch.Tensor]  # one tensor per calibration batch
# finished blocks' records; the next block's inputs (hidden, teacher); what the method carries to it
Restored = tuple[list[Record], Streams, Streams, dict[str, torch.Tensor]]


def _atomic_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, default=float))
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class Progress:
    def __init__(self, run_folder: Path, config: dict[str, Any]) -> None:
        self.path = Path(run_folder) / FOLDER
        self.config = config  # the resolved run config, without `resume`
        self._reference: dict[str, nn.Module] | None = None  # the base architecture, built once

    def finished(self) -> int:
        """Index of the last finished block, -1 when there is nothing to resume; a progress folder
        left by a different config is refused."""
        state = self.path / "state.json"
        if not state.is_file():
            return -1
        saved = json.loads(state.read_text())
        differ = differences(saved["config"], self.config)
        if differ:
            raise ShrinkError(
                f"cannot resume {self.path.parent}: it was started with a different config "
                f"(differs in: {', '.join(differ)}); resume with the same overrides or use a new folder"
            )
        return int(saved["finished"])

    def save_block(
        self,
        index: int,
        model: nn.Module,
        adapter: Adapter,
        head: str,
        rows: list[dict[str, Any]],
        spectra: dict[str, np.ndarray],
        hidden: list[torch.Tensor],
        teacher: list[torch.Tensor] | None,
        carried: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        prefix = adapter.block_path(index) + "."
        if self._reference is None:
            self._reference = reference_modules(model, head)
        edits = [
            e
            for e in structural_edits(model, head, self._reference)
            if e["path"].startswith(prefix) or e["path"] == prefix[:-1]  # the block itself (shortcuts)
        ]
        block = adapter.blocks()[index]
        _atomic_tensors(self.path / f"block_{index:03d}.safetensors", block.state_dict())
        record = {
            "edits": edits,
            "rows": rows,
            "spectra": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in spectra.items()},
        }
        _atomic_json(self.path / f"block_{index:03d}.json", record)
        streams = {f"hidden.{b}": h for b, h in enumerate(hidden)}
        streams |= {f"teacher.{b}": t for b, t in enumerate(teacher or [])}
        streams |= {f"carried.{name}": t for name, t in (carried or {}).items()}
        _atomic_tensors(self.path / f"inputs_{index:03d}.safetensors", streams)
        _atomic_json(self.path / "state.json", {"finished": index, "config": self.config})
        (self.path / f"inputs_{index - 1:03d}.safetensors").unlink(missing_ok=True)  # superseded

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Finished block `index`'s tensors (block-relative names): the store of `stream=true`."""
        return load_file(str(self.path / f"block_{index:03d}.safetensors"))

    def restore(
        self,
        model: nn.Module,
        adapter: Adapter,
        upto: int,
        weights: bool = True,
        placement: Placement | None = None,
    ) -> Restored:
        """Rebuild blocks 0..upto in `model`; returns their (rows, spectra), the saved inputs of
        block upto+1 (hidden, teacher) and what the method carried to it. Without `weights`
        (`stream=true`) only the blocks' structure is rebuilt; their tensors stay in the block
        files. A `placement` (device-mapped models) takes each block in and out around its
        rebuilding, as the runner does."""
        dtype = next(model.parameters()).dtype
        records = []
        for index in range(upto + 1):
            record = json.loads((self.path / f"block_{index:03d}.json").read_text())
            block = adapter.blocks()[index]
            if placement is not None:
                placement.enter(index, block)
            for edit in record["edits"]:
                apply_edit(model, edit, dtype)
            if weights:
                block.load_state_dict(self.block_state(index), strict=True, assign=True)
            if placement is not None:
                placement.leave(index, block)
            spectra = {k: np.asarray(v, dtype=np.float64) for k, v in record["spectra"].items()}
            records.append((record["rows"], spectra))
        streams = load_file(str(self.path / f"inputs_{upto:03d}.safetensors"))
        hidden = [streams[f"hidden.{b}"] for b in range(sum(k.startswith("hidden.") for k in streams))]
        teacher = [streams[f"teacher.{b}"] for b in range(sum(k.startswith("teacher.") for k in streams))]
        carried = {k.removeprefix("carried."): v for k, v in streams.items() if k.startswith("carried.")}
        return records, hidden, teacher, carried

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
