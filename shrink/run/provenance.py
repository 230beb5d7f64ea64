"""What produced a run's numbers, recorded in every metrics.json (not only when W&B is on): the
library versions and the git commit of the shrink checkout."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("shrink", "torch", "transformers", "lm_eval", "safetensors", "accelerate", "hydra-core")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """A git answer about the checkout shrink is imported from; None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "python": platform.python_version(),
        **{package: _version(package) for package in PACKAGES},
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,  # uncommitted changes to tracked files
    }
