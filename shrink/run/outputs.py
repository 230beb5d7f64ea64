"""The run folder's files. `metrics.json` is written last: a folder without it is not complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..errors import ShrinkError, first_line

# what a folder holds before its run began: Hydra's log, and the folder's lock (shrink.run.lock)
NOT_A_RUN = {"launch.log", ".shrink.run.lock"}
HYDRA_SUBDIR = ".hydra"  # Hydra's own record of the job, written here once the run starts
STALE = (
    "metrics.json", "error.txt", "layers.jsonl", "steps.jsonl", "plan.jsonl", "events.jsonl",
    "spectra.npz", "kept.png",
)  # fmt: skip


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.spectra: dict[str, np.ndarray] = {}
        self.rows: list[dict[str, Any]] = []

    def start(self, cfg: DictConfig) -> None:
        """Begin the run: clear what an earlier run here left (all of it with `overwrite=true`;
        a resumed run keeps its progress and checkpoint), record the config (and, under Hydra,
        its `.hydra/` files: `hydra.output_subdir` is null so that Hydra writes nothing before
        the folder is locked and the run is known to go ahead)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if cfg.get("overwrite"):
            for entry in self.path.iterdir():
                if entry.name not in NOT_A_RUN:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for stale in STALE:
            (self.path / stale).unlink(missing_ok=True)
        OmegaConf.save(cfg, self.path / "config.yaml", resolve=True)
        save_hydra_record(cfg, self.path / HYDRA_SUBDIR)

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

    def add_steps(self, rows: list[dict[str, Any]]) -> None:
        """One row per linear that the sparsity / quantization steps edited (shrink/blocks/steps.py)."""
        if rows:
            self._append("steps.jsonl", rows)

    def finish(self, metrics: dict[str, Any]) -> list[Path]:
        """Write spectra, plots and (last) metrics.json; returns the plots written."""
        np.savez_compressed(self.path / "spectra.npz", **self.spectra)
        plots = []
        if self.rows:
            plots.append(plot_kept(self.rows, self.path / "kept.png"))
        if self.spectra:
            plots.append(plot_spectra(self.spectra, self.path / "spectra.png"))
        tasks = {k: v for k, v in metrics.get("eval", {}).get("zeroshot", {}).items() if k != "mean"}
        if tasks:
            plots.append(plot_tasks(tasks, self.path / "zeroshot.png"))
        from ..checkpoints.model_card import write as write_card  # the checkpoint's README.md, before the end

        write_card(self.path, metrics)
        (self.path / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
        return plots


def write_failed(path: str | Path, cfg: DictConfig, error: BaseException) -> None:
    """`metrics.json` with `status: failed`, so a sweep's report lists the job and why it failed;
    the traceback goes to `error.txt`."""
    import traceback

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "error.txt").write_text("".join(traceback.format_exception(error)))
    message = first_line(error) if str(error).strip() else ""
    metrics = {
        "status": "failed",
        "error": f"{type(error).__name__}: {message}".rstrip(": "),
        **{k: OmegaConf.select(cfg, f"{k}.name") for k in ("model", "method", "schedule")},
        "budget": OmegaConf.select(cfg, "budget"),
    }
    (path / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))


def save_hydra_record(cfg: DictConfig, folder: Path) -> None:
    """What Hydra itself writes to `.hydra/` (the job's config, Hydra's config, the overrides)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(hydra_cfg, folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def read_metrics(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def remove_if_empty(path: str | Path) -> None:
    """Delete a run folder that holds nothing but what precedes a run (Hydra's log, the lock): a
    run that failed validation leaves no folder to be mistaken for a run."""
    path = Path(path)
    if path.is_dir() and {p.name for p in path.iterdir()} <= NOT_A_RUN:
        shutil.rmtree(path, ignore_errors=True)


def check_reuse(path: Path, cfg: DictConfig) -> None:
    """A folder that holds an earlier run is continued (`resume=true`) or replaced
    (`overwrite=true`), never silently overwritten."""
    if cfg.resume or cfg.get("overwrite") or not (path / "config.yaml").is_file():
        return
    previous = read_metrics(path)
    status = (previous or {}).get("status")
    held = "a finished run" if status == "ok" else "a failed run" if status else "an unfinished run"
    raise ShrinkError(
        f"run folder {path} holds {held}: resume=true continues it (a finished one is kept as it is), "
        "overwrite=true replaces it; or choose another folder (hydra.run.dir=…)"
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(spectra: dict[str, np.ndarray], path: Path) -> Path:
    """One panel per site linear (`self_attn.q_proj`, …): its spectrum in every block, normalised
    by the largest value, coloured from the first block (light) to the last (dark)."""
    plt = _pyplot()
    by_name: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key, values in spectra.items():
        block, _, name = key.partition("/")
        if len(values) and np.max(np.abs(values)) > 0:
            by_name.setdefault(name, []).append((int(block.removeprefix("block")), np.asarray(values)))
    cols = min(3, max(1, len(by_name)))
    rows = -(-len(by_name) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    blocks = max((b for series in by_name.values() for b, _ in series), default=0) + 1
    for ax, (name, series) in zip(axes.flat, sorted(by_name.items()), strict=False):
        for block, values in sorted(series, key=lambda item: item[0]):
            v = np.sort(np.abs(values))[::-1]
            ax.plot(v / v[0], color=plt.cm.viridis(block / max(1, blocks - 1)), linewidth=0.8)
        ax.set(title=name, xlabel="index", yscale="log")
    for ax in list(axes.flat)[len(by_name) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_tasks(tasks: dict[str, dict[str, Any]], path: Path) -> Path:
    """Dense vs compressed main metric per zero-shot task, with the stderr as error bars."""
    plt = _pyplot()
    names = list(tasks)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.5))
    for offset, which in ((-0.2, "dense"), (0.2, "compressed")):
        values = [tasks[t].get(which) or 0.0 for t in names]
        errors = [tasks[t].get(f"{which}_stderr") or 0.0 for t in names]
        ax.bar(x + offset, values, 0.4, yerr=errors, label=which, capsize=2)
    ax.set_xticks(x, [f"{t}\n({tasks[t]['metric']})" for t in names], fontsize="small")
    ax.set(ylabel="score", ylim=(0, 1), title="zero-shot tasks")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_kept(rows: list[dict[str, Any]], path: Path) -> Path:
    """Kept share of each site's parameters per block, and (for pruning) kept units per block."""
    plt = _pyplot()

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
    return path
