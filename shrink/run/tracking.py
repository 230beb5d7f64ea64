"""One tracking interface with three backends: none, jsonl, wandb.

The run folder's own files (config.yaml, metrics.json, layers.jsonl, spectra.npz) are written by
`shrink.run.outputs` whatever the backend; a tracker sends the same things elsewhere. Only this file
imports wandb, and only when that backend is chosen.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from omegaconf import DictConfig

from ..errors import ShrinkError


class Tracker:
    """The no-op backend; every other backend overrides what it sends."""

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None = None) -> None: ...

    def log_block(self, index: int, rows: list[dict[str, Any]], spectra: dict[str, np.ndarray]) -> None: ...

    def log_plan(self, rows: list[dict[str, Any]]) -> None: ...

    def log_heal(self, row: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, Any]) -> None: ...

    def log_image(self, name: str, path: Path) -> None: ...

    def finish(self, status: str = "ok") -> None: ...

    def closing_line(self) -> str | None:
        """What a finished run's summary says about where this backend's record went (None: nothing)."""
        return None


class JsonlTracker(Tracker):
    """Appends one JSON event per line to `events.jsonl` in the run folder."""

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None = None) -> None:
        self.path = run_dir / "events.jsonl"
        self._write({"event": "start", "name": name, "group": group, "config": config})

    def _write(self, event: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(event, default=float) + "\n")

    def log_block(self, index: int, rows: list[dict[str, Any]], spectra: dict[str, np.ndarray]) -> None:
        self._write({"event": "block", "block": index, "rows": rows})

    def log_plan(self, rows: list[dict[str, Any]]) -> None:
        self._write({"event": "plan", "rows": rows})

    def log_heal(self, row: dict[str, Any]) -> None:
        self._write({"event": "heal", **row})

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        self._write({"event": "metrics", "metrics": metrics})

    def finish(self, status: str = "ok") -> None:
        self._write({"event": "finish", "status": status})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


class WandbTracker(Tracker):
    """Weights & Biases: config, per-block spectra line plots, per-layer table, summary metrics."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = []
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], name: str, group: str | None = None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            mode=str(self.cfg.mode.value if hasattr(self.cfg.mode, "value") else self.cfg.mode),
            group=group,
            tags=list(self.cfg.tags),
            name=name,
            dir=str(run_dir),
            config=config,
            reinit="finish_previous",
        )

    def log_block(self, index: int, rows: list[dict[str, Any]], spectra: dict[str, np.ndarray]) -> None:
        self.rows.extend(rows)
        if spectra:
            keys = list(spectra)
            plot = self.wandb.plot.line_series(
                xs=[list(range(len(spectra[k]))) for k in keys],
                ys=[spectra[k].tolist() for k in keys],
                keys=keys,
                title=f"block {index}: singular values",
                xname="index",
            )
            self.run.log({f"spectra/block_{index:03d}": plot, "block": index})

    def log_plan(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            cols = list(dict.fromkeys(c for r in rows for c in r))  # rows of different units differ
            self.run.log(
                {"plan": self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}
            )

    def log_heal(self, row: dict[str, Any]) -> None:
        """One heal step: the loss curve, against the tokens trained on."""
        self.run.log({f"heal/{k}": v for k, v in row.items()})

    def log_image(self, name: str, path: Path) -> None:
        if path.exists():
            self.run.log({name: self.wandb.Image(str(path))})

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        if self.rows:
            cols = sorted({c for r in self.rows for c in r})
            table = self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in self.rows])
            self.run.log({"layers": table})
        tasks = {k: v for k, v in metrics.get("eval", {}).get("zeroshot", {}).items() if k != "mean"}
        if tasks:
            cols = ["task", "metric", "n", "dense", "dense_stderr", "compressed", "compressed_stderr"]
            data = [[t, *(row.get(c) for c in cols[1:])] for t, row in tasks.items()]
            self.run.log({"zeroshot": self.wandb.Table(columns=cols, data=data)})
        self.run.summary.update(_flatten(metrics))

    def finish(self, status: str = "ok") -> None:
        if getattr(self, "run", None) is not None:  # None when wandb.init itself failed
            self.offline_dir = self.run.settings.sync_dir if self.run.settings.mode == "offline" else None
            self.run.finish(exit_code=0 if status == "ok" else 1)

    def closing_line(self) -> str | None:
        """An offline run lives in `<run>/wandb/` (not where `wandb sync` looks by default): the
        exact command that uploads it."""
        where = getattr(self, "offline_dir", None)
        return f"  wandb      offline; upload with: wandb sync {where}" if where else None


def check_logger(cfg: DictConfig) -> None:
    """Refuse, before any work, a W&B online run that has no credentials to log in with (the
    places wandb itself looks: WANDB_API_KEY, an identity token file, the netrc entry that
    `wandb login` writes)."""
    mode = str(getattr(cfg.get("mode"), "value", cfg.get("mode")))
    if cfg.name != "wandb" or mode != "online":
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        login = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        login = None
    if login is None:
        raise ShrinkError(
            f"logger.mode=online needs W&B credentials for {host} and found none: run `wandb login` or set "
            "WANDB_API_KEY, or log offline (logger.mode=offline, the default) and `wandb sync` later"
        )


def make_tracker(cfg: DictConfig) -> Tracker:
    if cfg.name == "none":
        return Tracker()
    if cfg.name == "jsonl":
        return JsonlTracker()
    if cfg.name == "wandb":
        return WandbTracker(cfg)
    raise ShrinkError(f"unknown logger {cfg.name!r}; valid: none, jsonl, wandb")
