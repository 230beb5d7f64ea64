"""Entry point: `python launch.py [overrides]` or `python launch.py -m [sweep overrides]`."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import shrink.config  # noqa: F401  (registers the config schemas)
from shrink.cli import INTERRUPTED, one_line_error, override_under_null
from shrink.errors import ShrinkError
from shrink.lock import FolderBusy


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from shrink.outputs import read_metrics, write_failed
    from shrink.pipeline import run

    hydra_cfg = HydraConfig.get()
    folder = hydra_cfg.runtime.output_dir
    try:
        return run(cfg)
    except KeyboardInterrupt:
        print(f"error: interrupted; continue with resume=true hydra.run.dir={folder}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
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
    # raise inside the sweeper and ends the search). A folder in use by another process is left
    # alone; the sweep's closing summary (shrink/sweep.py) counts the job as unfinished.
    if read_metrics(folder) is None and not isinstance(failure, FolderBusy):
        write_failed(folder, cfg, failure)
    logging.getLogger("shrink").error("job %s failed: %s", hydra_cfg.job.num, failure)
    return None


if __name__ == "__main__":
    # Hydra's composition errors (an unknown `method=` name, a value of the wrong type) reach us
    # as exceptions, to be printed as one line with exit code 2 like every other bad input.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except hydra.errors.HydraException as err:
        print(f"error: {one_line_error(err)}", file=sys.stderr)
        sys.exit(2)
    except AssertionError as err:
        message = override_under_null(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
