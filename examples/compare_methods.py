"""Compare methods and budgets: one run per pair, each logged to W&B (offline unless you log in),
then one table across the run folders, as `python -m shrink report` makes it.

    python examples/compare_methods.py                          # SmolLM2-135M: half an hour
    python examples/compare_methods.py --model tiny-llama --quick

The same comparison as a Hydra sweep, whose jobs W&B groups by the sweep folder:

    python launch.py -m method=id,svdllm budget=0.5,0.8 eval=ppl
    python -m shrink report multirun/ --out report/
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import QUICK, QUICK_PPL, arguments

import shrink
from shrink.run import report


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "smollm2-135m")
    settings = [*QUICK, *QUICK_PPL] if args.quick else []
    out = Path(tempfile.mkdtemp(prefix="shrink-compare-"))
    for method in ("id", "svdllm"):
        for budget in (0.5, 0.8):
            shrink.compress(
                args.model, method=method, budget=budget, folder=out / f"{method}-{budget}",
                overrides=["eval=ppl", "schedule=uniform", "logger=wandb", "logger.mode=offline", *settings],
            )  # fmt: skip
    report.main([str(out), "--out", str(out / "report")])
    print((out / "report" / "report.md").read_text())


if __name__ == "__main__":
    main()
