"""Check that a refactor changed no result: run the same SmolLM2 jobs with the code of an earlier
revision and with the working tree, and compare metrics.json numbers (timings, memory and
versions aside) and every checkpoint tensor, bit for bit.

    python bench/same.py --before HEAD~1            # the working tree against HEAD~1
    python bench/same.py --before REV --only id-greedy stream

Jobs (small calibration and test sets, so each takes about a minute on 2 cores): id with uniform
and greedy, svdllm, distill, each at 0.5; id streamed (stream=true); id under a device map with
blocks offloaded to disk; id interrupted after block 3 and resumed (resume=true).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["calib.nsamples=4", "calib.seq_len=256", "eval=ppl", "eval.ppl.max_tokens=2048", "logger=none"]
JOBS: dict[str, list[str]] = {
    "id-uniform": ["method=id", "schedule=uniform", "budget=0.5"],
    "id-greedy": ["method=id", "schedule=greedy", "budget=0.5"],
    "svdllm": ["method=svdllm", "budget=0.5"],
    "distill": ["method=distill", "budget=0.5", "method.steps=8"],
    # schedules explicit, so a job means the same under every release's defaults
    "stream": ["method=id", "schedule=uniform", "budget=0.5", "stream=true"],
    "device-map": [
        "method=id",
        "schedule=uniform",
        "budget=0.5",
        "model.device_map=auto",
        "model.max_memory={cpu:300MB}",
    ],
    "resume": ["method=id", "schedule=uniform", "budget=0.5", "resume=true"],
}
NOT_RESULTS = {"peak_rss_mb", "versions", "dense_cached", "checkpoint_mb"}

# Runs one job in-process with the code of the tree it is started in; `interrupt` kills it after
# that block's checkpoint, and the same job is then resumed.
DRIVER = """
import os
import sys
from hydra import compose, initialize_config_dir
try:  # the package's layout of the tree being run
    from shrink.run.plugins import load_plugins
    from shrink.run.pipeline import run
    from shrink.run.progress import Progress
    load_plugins()
except ImportError:
    import shrink.config
    from shrink.pipeline import run
    from shrink.progress import Progress
folder, interrupt, *overrides = sys.argv[1:]
import shrink
assert shrink.__file__.startswith(os.getcwd()), (shrink.__file__, os.getcwd())  # this tree's code
with initialize_config_dir(config_dir=os.getcwd() + "/conf", version_base="1.3"):
    cfg = compose("config", overrides=overrides)
if int(interrupt) >= 0:
    real = Progress.save_block
    def save_then_stop(self, index, *a, **k):
        real(self, index, *a, **k)
        if index == int(interrupt):
            raise KeyboardInterrupt
    Progress.save_block = save_then_stop
    try:
        run(cfg, run_dir=folder)
    except KeyboardInterrupt:
        pass
    Progress.save_block = real
run(cfg, run_dir=folder)
"""


def run_job(tree: Path, name: str, folder: Path) -> None:
    interrupt = "3" if name == "resume" else "-1"
    cmd = [sys.executable, "-c", DRIVER, str(folder), interrupt, *JOBS[name], *SMALL]
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed in {tree}:\n{out.stderr[-3000:]}")


def numbers(metrics: Any, where: str = "") -> dict[str, Any]:
    """Every leaf of metrics.json by dotted key, without timings and other run-specific values."""
    if isinstance(metrics, dict):
        out = {}
        for key, value in metrics.items():
            if key not in NOT_RESULTS and not key.endswith("_seconds"):
                out |= numbers(value, f"{where}{key}.")
        return out
    return {where.rstrip("."): metrics}


def tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in sorted((folder / "model").glob("*.safetensors")):
        state |= load_file(str(file))
    return state


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    a, b = (
        numbers(json.loads((before / "metrics.json").read_text())),
        numbers(json.loads((after / "metrics.json").read_text())),
    )
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        if not same:
            problems.append(f"metrics {key}: {x} -> {y}")
    ta, tb = tensors(before), tensors(after)
    if set(ta) != set(tb):
        problems.append(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
    problems += [f"tensor {n} differs" for n in sorted(set(ta) & set(tb)) if not ta[n].equal(tb[n])]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision whose code gives the reference")
    parser.add_argument("--only", nargs="*", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temp folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="shrink-same-"))
    base = out / "before-tree"
    if not base.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.before], cwd=ROOT, check=True)
    failures = 0
    try:
        for name in args.only:
            run_job(base, name, out / "before" / name)
            run_job(ROOT, name, out / "after" / name)
            problems = compare(out / "before" / name, out / "after" / name)
            ppl = json.loads((out / "after" / name / "metrics.json").read_text())["eval"]["ppl"]["wiki"]
            status = "same" if not problems else f"DIFFERENT ({len(problems)})"
            print(f"{name:<12} {status}  ppl {ppl['dense']:.4f} -> {ppl['compressed']:.4f}", flush=True)
            for line in problems[:10]:
                print(f"    {line}")
            failures += bool(problems)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
