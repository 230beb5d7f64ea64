"""What makes two runs the same run: the resolved config, less the keys that change no result.

`resume=true` continues a folder only under the config that started it: an unfinished run's
per-block progress must match the compression config, and a finished run's metrics must match
everything that produced them (evaluation included).
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

# never part of a run's identity: how it was launched and where it logs
NOT_RESULTS = ("resume", "overwrite", "hydra", "logger")


def identity(cfg: DictConfig, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved config as plain JSON values, without the launch-only keys and `ignore`."""
    return plain(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), ignore)


def plain(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config as JSON would give it back (lists, not tuples; enum values as strings)."""
    config = json.loads(json.dumps(config, default=str))
    for key in (*NOT_RESULTS, *ignore):
        config.pop(key, None)
    return config


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{where}{k}.")]
    return [] if old == new else [where.rstrip(".")]
