"""Entry point: `python launch.py [overrides]` or `python launch.py -m [sweep overrides]`."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from shrink.errors import ShrinkError, first_line
from shrink.run.cli import (
    INTERRUPTED,
    one_line_error,
    override_under_null,
    resume_arguments,
    resume_command,
)
from shrink.run.lock import FolderBusy
from shrink.run.plugins import load_plugins

load_plugins()  # their schemas must be in Hydra's ConfigStore before it composes


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from shrink.run.outputs import read_metrics, write_failed
    from shrink.run.pipeline import run

    hydra_cfg = HydraConfig.get()
    folder = hydra_cfg.runtime.output_dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return run(cfg)
    except KeyboardInterrupt:
        again = resume_command(hydra_cfg.sweep.dir if multirun else folder, multirun, sys.argv[0])
        hint = f"continue with: {again}" if again else "the run had not begun: nothing to resume"
        print(f"error: interrupted; {hint}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except ShrinkError as err:
        if not multirun:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        failure: BaseException = err
    except Exception as err:  # noqa: BLE001  (a sweep outlives its failed jobs)
        if not multirun:
            raise
        failure = err
    # In a sweep, a failed job is recorded (metrics.json: status failed) and the sweep goes on.
    # It returns None, which the Optuna sweeper records as a failed trial (a NaN makes optuna 2.x
    # raise inside the sweeper and ends the search). A folder in use by another process is left
    # alone; the sweep's closing summary (shrink/run/sweep.py) counts the job as unfinished.
    if read_metrics(folder) is None and not isinstance(failure, FolderBusy):
        write_failed(folder, cfg, failure)
    logging.getLogger("shrink").error("job %s failed: %s", hydra_cfg.job.num, failure)
    return None


if __name__ == "__main__":
    # Hydra's composition errors (an unknown `method=` name, a value of the wrong type) and the
    # checks that run before the run folder exists (shrink.run.validation.CheckFirst) reach us as
    # exceptions, to be printed as one line with exit code 2 like every other bad input.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.argv[1:], resumed = resume_arguments(sys.argv[1:])
    if resumed:
        print(resumed, file=sys.stderr)
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted before the run began: nothing to resume", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except ShrinkError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except hydra.errors.HydraException as err:
        print(f"error: {one_line_error(err)}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as err:  # an interpolation that cannot resolve, e.g. in hydra.run.dir
        print(f"error: the config does not resolve: {first_line(err)}", file=sys.stderr)
        sys.exit(2)
    except (AssertionError, AttributeError) as err:
        message = override_under_null(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
