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
        self.rows: list[dict[str, Any]] = []

    def start(self, cfg: DictConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.json", "layers.jsonl", "plan.jsonl", "spectra.npz", "kept.png"):
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
        self.rows.extend(rows)
        for name, values in spectra.items():
            self.spectra[f"block{index:03d}/{name}"] = np.asarray(values, dtype=np.float64)

    def finish(self, metrics: dict[str, Any]) -> None:
        np.savez_compressed(self.path / "spectra.npz", **self.spectra)
        if self.rows:
            plot_kept(self.rows, self.path / "kept.png")
        (self.path / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))


def remove_if_empty(path: str | Path) -> None:
    """Delete a run folder that holds nothing but Hydra's own start-up files (a run that failed
    validation), so it cannot be mistaken for a run."""
    path = Path(path)
    if path.is_dir() and {p.name for p in path.iterdir()} <= HYDRA_ONLY:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def plot_kept(rows: list[dict[str, Any]], path: Path) -> None:
    """Kept share of each site's parameters per block, and (for pruning) kept units per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = [r for r in rows if "kept" in r and "total" in r]
    fig, axes = plt.subplots(1, 2 if units else 1, figsize=(11 if units else 6, 3.5), squeeze=False)
    by_site: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        cell = by_site.setdefault(r["site"], {}).setdefault(r["block"], [0.0, 0.0])
        cell[0] += r["params_kept"]
        cell[1] += r["params_dense"]
    ax = axes[0][0]
    for site, blocks in by_site.items():
        xs = sorted(blocks)
        ax.plot(xs, [blocks[b][0] / blocks[b][1] for b in xs], marker=".", label=site)
    ax.set(xlabel="block", ylabel="kept share of params", ylim=(0, 1.05), title="kept per block")
    ax.legend(fontsize="small")
    if units:
        ax = axes[0][1]
        for site in dict.fromkeys(r["site"] for r in units):
            pts = sorted((r["block"], r["kept"]) for r in units if r["site"] == site)
            total = next(r["total"] for r in units if r["site"] == site)
            ax.plot(*zip(*pts, strict=True), marker=".", label=f"{site} (of {total})")
        ax.set(xlabel="block", ylabel="kept units", yscale="log", title="kept neurons / heads")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
