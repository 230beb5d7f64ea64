"""Entry point: `python launch.py [overrides]` or `python launch.py -m [sweep overrides]`."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import shrink.config  # noqa: F401  (registers the config schemas)
from shrink.errors import ShrinkError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from shrink.outputs import read_metrics, write_failed
    from shrink.pipeline import run

    hydra_cfg = HydraConfig.get()
    try:
        return run(cfg)
    except ShrinkError as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        failure: BaseException = err
    except Exception as err:  # noqa: BLE001  (a sweep outlives its failed jobs)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        failure = err
    # In a sweep, a failed job is recorded (metrics.json: status failed) and the sweep goes on.
    # It returns None, which the Optuna sweeper records as a failed trial (a NaN makes optuna 2.x
    # raise inside the sweeper and ends the search).
    folder = hydra_cfg.runtime.output_dir
    if read_metrics(folder) is None:  # failed before the run began (bad config): record it too
        write_failed(folder, cfg, failure)
    logging.getLogger("shrink").error("job %s failed: %s", hydra_cfg.job.num, failure)
    return None


if __name__ == "__main__":
    main()
