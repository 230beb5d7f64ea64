"""What the launcher does around Hydra: errors Hydra raises before a job starts as one line, like
every other bad input; the checks that run before Hydra creates a run folder (`CheckFirst`); and
`resume=true`, which continues a folder under the overrides it was started with, the command
Ctrl-C prints."""

from __future__ import annotations

import copy
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback

from ..errors import ShrinkError, first_line
from ..models.catalog import MODEL_CONFIGS, is_local_path, local_hint

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def one_line_error(err: HydraException) -> str:
    """An unknown config-group option names the valid ones; any other composition error keeps
    its first line and the first line of its cause (the reason, e.g. a failed type conversion)."""
    missing = getattr(err, "missing_cfg_file", None)
    options = getattr(err, "options", None)
    if isinstance(err, MissingConfigException) and missing and options:
        group, name = _group_and_option(str(missing))
        line = f"unknown {group or 'config'} {name!r}; valid: {', '.join(sorted(options))}"
        if group == "model" and is_local_path(name):
            line += f"; a local model loads with {local_hint(name)}"
        return line
    lines = [first_line(err)]
    if err.__cause__ is not None and first_line(err.__cause__) not in lines[0]:
        lines.append(first_line(err.__cause__))
    return ": ".join(line.rstrip(".") for line in lines if line)


def _group_and_option(missing: str) -> tuple[str, str]:
    """Split Hydra's `<group>/<option>` where the option may itself hold slashes (`model=/data/m`
    gives `model//data/m`): a group of `conf/` is one folder deep; Hydra's own are two."""
    first, _, rest = missing.partition("/")
    if (MODEL_CONFIGS.parent / first).is_dir():
        return first, rest
    group, _, name = missing.rpartition("/")
    return group, name


def override_under_null(err: BaseException) -> str | None:
    """OmegaConf asserts (rather than raising its own error) when a command-line override sets a
    key under a node that is null, e.g. `eval=none eval.ppl.seq_len=2048`, and fails with an
    AttributeError when it merges a mapping into a null node, e.g. `eval=quick eval.speed={…}`:
    name the override."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        override = frame.f_locals.get("override")
        if frame.f_code.co_name == "_apply_overrides_to_config" and override is not None:
            key = str(override.key_or_group)
            merged = isinstance(override.value(), dict)
            null = key if merged else key.rpartition(".")[0] or key
            return (
                f"cannot set {key}: {null} is null in this config (nothing there to set; e.g. "
                "eval=none runs no perplexity): choose a config group option that has it"
            )
        tb = tb.tb_next
    return None


VALUE_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides) of a launcher command line."""
    flags, overrides, it = [], [], iter(args)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in VALUE_FLAGS:
                flags.append(next(it, ""))
        else:
            overrides.append(arg)
    return flags, overrides


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _recorded(folder: Path, multirun: bool) -> tuple[list[str], str] | None:
    """The overrides and config name a run (`.hydra/`) or a sweep (`multirun.yaml`) was started
    with, as Hydra recorded them; None where there is no record."""
    from omegaconf import OmegaConf

    try:
        if multirun:
            hydra = OmegaConf.load(folder / "multirun.yaml").hydra
            return list(hydra.overrides.task), str(hydra.job.config_name)
        overrides = list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
        hydra = OmegaConf.load(folder / ".hydra" / "hydra.yaml")  # Hydra's node, or shrink's record of it
        return overrides, str(hydra.get("hydra", hydra).job.config_name)
    except (OSError, AttributeError, ValueError):
        return None


def resume_arguments(args: list[str]) -> tuple[list[str], str | None]:
    """`resume=true hydra.run.dir=DIR` (or `-m resume=true hydra.sweep.dir=DIR`) continues DIR
    under the config that started it: the overrides Hydra recorded there come first and the
    command line's after them, which win where both set a key. Returns the arguments to launch
    with and a line saying what was taken from DIR (None when nothing was)."""
    flags, overrides = _split(args)
    values = {_key(o): o.partition("=")[2] for o in overrides}
    multirun = "-m" in flags or "--multirun" in flags
    where = values.get("hydra.sweep.dir" if multirun else "hydra.run.dir")
    if values.get("resume", "").lower() != "true" or not where:
        return args, None
    recorded = _recorded(Path(where), multirun)
    if recorded is None:
        return args, None
    saved, config_name = recorded
    kept = [o for o in saved if _key(o) not in values]
    if config_name != "config" and not {"-cn", "--config-name"} & set(flags):
        flags += ["-cn", config_name]
    note = f"shrink: resuming {where} with its own overrides: {' '.join(kept) or '(none)'}"
    return [*flags, *kept, *overrides], note


def resume_command(folder: str | Path, multirun: bool, launcher: str) -> str | None:
    """The command that continues an interrupted run (or sweep) in `folder`, as it can be pasted;
    None when the run had not begun (nothing recorded there to resume)."""
    if _recorded(Path(folder), multirun) is None:
        return None
    python = Path(sys.executable)
    try:
        python = python.relative_to(Path.cwd())
    except ValueError:
        python = Path("python")
    where = f"hydra.sweep.dir={folder}" if multirun else f"hydra.run.dir={folder}"
    words = [str(python), launcher, *(["-m"] if multirun else []), "resume=true", where]
    return " ".join(shlex.quote(w) for w in words)


class CheckFirst(Callback):
    """Runs every check that needs no weights before Hydra creates a single run's folder (and its
    parents), so a bad input leaves nothing under `outputs/`; a sweep's jobs are checked in their
    own folders, which record why they failed. Hydra turns a callback's exceptions into warnings,
    so the refusal is printed here as the launcher prints it (one line, exit code 2). Registered
    in `conf/config.yaml`."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        from .validation import validate

        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            overrides = list(task.hydra.overrides.task)
            del task["hydra"]
        try:
            validate(task, (overrides, False))
        except ShrinkError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
