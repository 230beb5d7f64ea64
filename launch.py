"""Entry point: `python launch.py [overrides]` or `python launch.py -m [sweep overrides]`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import shrink.config  # noqa: F401  (registers the config schemas)
from shrink.errors import ShrinkError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from shrink.pipeline import run

    try:
        return run(cfg)
    except ShrinkError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
