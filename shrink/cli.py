"""What the launcher prints for errors Hydra raises before a job starts: one line, like every
other bad input."""

from __future__ import annotations

from hydra.errors import HydraException, MissingConfigException

from .errors import first_line

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def one_line_error(err: HydraException) -> str:
    """An unknown config-group option names the valid ones; any other composition error keeps
    its first line and the first line of its cause (the reason, e.g. a failed type conversion)."""
    missing = getattr(err, "missing_cfg_file", None)
    options = getattr(err, "options", None)
    if isinstance(err, MissingConfigException) and missing and options:
        group, _, name = str(missing).rpartition("/")
        return f"unknown {group or 'config'} {name!r}; valid: {', '.join(sorted(options))}"
    lines = [first_line(err)]
    if err.__cause__ is not None and first_line(err.__cause__) not in lines[0]:
        lines.append(first_line(err.__cause__))
    return ": ".join(line.rstrip(".") for line in lines if line)


def override_under_null(err: AssertionError) -> str | None:
    """OmegaConf asserts (rather than raising its own error) when a command-line override sets a
    key under a node that is null, e.g. `eval=none eval.ppl.seq_len=2048`: name the override."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        override = frame.f_locals.get("override")
        if frame.f_code.co_name == "_apply_overrides_to_config" and override is not None:
            key = str(override.key_or_group)
            parent = key.rpartition(".")[0] or key
            return (
                f"cannot set {key}: {parent} is null in this config (nothing there to set; e.g. "
                "eval=none runs no perplexity): choose a config group option that has it"
            )
        tb = tb.tb_next
    return None
