"""The closing lines of a sweep: how many jobs finished ok, failed or never finished, and where.

A Hydra callback (registered in `conf/config.yaml`), so it sees every launcher's jobs alike: it
reads each job folder's `metrics.json` rather than the launcher's return values, which joblib
and submitit keep in other processes. A sweep with any job not ok exits with code 1, after all
its jobs ran.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .outputs import NOT_A_RUN, read_metrics

SWEEP_FAILED = 1


def job_folders(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders: its subfolders where a job started (Hydra's log, a lock) or
    recorded its end (metrics.json)."""
    if not sweep_dir.is_dir():
        return []
    marks = (*NOT_A_RUN, "metrics.json")
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and any((p / n).exists() for n in marks)),
        key=lambda p: (len(p.name), p.name),
    )


def tally(sweep_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """Job folders by outcome: ok, failed (with the error) and unfinished (no metrics.json:
    killed, still running elsewhere, or refused because another process held the folder)."""
    outcome: dict[str, list[tuple[Path, str]]] = {"ok": [], "failed": [], "unfinished": []}
    for folder in job_folders(sweep_dir):
        metrics = read_metrics(folder)
        if metrics is None:
            outcome["unfinished"].append((folder, "no metrics.json"))
        elif metrics.get("status") == "ok":
            outcome["ok"].append((folder, ""))
        else:
            outcome["failed"].append((folder, str(metrics.get("error", "failed"))))
    return outcome


def summary_lines(sweep_dir: Path, outcome: dict[str, list[tuple[Path, str]]]) -> list[str]:
    counts = ", ".join(f"{len(v)} {k}" for k, v in outcome.items())
    lines = [f"sweep {sweep_dir}: {counts}"]
    for kind in ("failed", "unfinished"):
        lines += [f"  {kind}: {folder.name}: {why}" for folder, why in outcome[kind]]
    return lines


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcome = tally(sweep_dir)
        print("\n".join(summary_lines(sweep_dir, outcome)), file=sys.stderr)
        if outcome["failed"] or outcome["unfinished"]:
            raise SystemExit(SWEEP_FAILED)
