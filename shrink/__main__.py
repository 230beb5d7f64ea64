"""`python -m shrink export|heal|report …`: the commands beside `launch.py`.

python -m shrink export <run or model folder> [--out DIR]   # bring a checkpoint up to date
python -m shrink heal <run folder> heal=kd [heal.… …]        # heal a saved checkpoint (accelerate launch too)
python -m shrink report <folders…> [--out DIR]              # one table and plot across runs
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "export": "shrink.checkpoints.export",
    "heal": "shrink.run.heal_command",
    "report": "shrink.run.report",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
