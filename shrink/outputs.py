"""The run folder's files. `metrics.json` is written last: a folder without it is not complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

HYDRA_ONLY = {".hydra", "launch.log"}


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.spectra: dict[str, np.ndarray] = {}

    def start(self, cfg: DictConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.json", "layers.jsonl", "plan.jsonl", "spectra.npz"):
            (self.path / stale).unlink(missing_ok=True)
        OmegaConf.save(cfg, self.path / "config.yaml", resolve=True)

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        with (self.path / name).open("a") as f:
            for row in rows:
                f.write(json.dumps(row, default=float) + "\n")

    def add_plan(self, rows: list[dict[str, Any]]) -> None:
        self._append("plan.jsonl", rows)

    def add_block(self, index: int, rows: list[dict[str, Any]], spectra: dict[str, np.ndarray]) -> None:
        self._append("layers.jsonl", rows)
        for name, values in spectra.items():
            self.spectra[f"block{index:03d}/{name}"] = np.asarray(values, dtype=np.float64)

    def finish(self, metrics: dict[str, Any]) -> None:
        np.savez_compressed(self.path / "spectra.npz", **self.spectra)
        (self.path / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))


def remove_if_empty(path: str | Path) -> None:
    """Delete a run folder that holds nothing but Hydra's own start-up files (a run that failed
    validation), so it cannot be mistaken for a run."""
    path = Path(path)
    if path.is_dir() and {p.name for p in path.iterdir()} <= HYDRA_ONLY:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
