"""What recovery buys per method: held-out perplexity against heal tokens, for `heal=lora` and
`heal=kd`, per (method, budget).

Each (method, budget) is compressed once by the launcher (`eval=none`, checkpoint saved) and
reused; each healer then trains a fresh copy of that checkpoint (`shrink.load`) with the run's own
heal code and config, and scores the held-out parts of the offline Wikipedia text and C4 sample
(the protocol of `bench/quality.py`: 8192 tokens each) before training and at each mark. The marks
are points along one run whose learning-rate schedule spans the largest mark, not separate runs.
Writes `results.json`, `heal.md` (the table) and `heal.png` (the curves).

    .venv/bin/python bench/heal.py                                           # id and svdllm, 0.8 and 0.5
    .venv/bin/python bench/heal.py --methods id --budgets 0.5 --heals kd --marks 16384 65536
    .venv/bin/python bench/heal.py --set heal.lr=5e-4 heal.params=full --out /tmp/heal-full
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from shrink.api import compose_config

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ("wiki", "c4-sample")


def compressed(out: Path, model: str, method: str, budget: float) -> Path:
    """The checkpoint of (method, budget), compressed by the launcher unless it exists."""
    folder = out / "compressed" / f"{method}-b{budget}"
    if not (folder / "model" / "manifest.json").exists():
        cmd = [
            sys.executable, str(ROOT / "launch.py"), f"model={model}", f"method={method}", f"budget={budget}",
            "eval=none", "logger=none", f"hydra.run.dir={folder}", "overwrite=true",
        ]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True)
    return folder / "model"


def held_out(model, tokenizer, tokens: int) -> dict[str, float]:
    from shrink.data import corpora
    from shrink.evaluation.perplexity import perplexity

    was_training = model.training
    model.eval()
    scores = {
        corpus: perplexity(
            model, corpora.test_windows(corpus, tokenizer, 1024, tokens), 1, torch.device("cpu")
        )["ppl"]
        for corpus in CORPORA
    }
    model.train(was_training)
    return scores


class Marks(TrainerCallback):
    """Scores the model being healed when the tokens trained on reach each mark."""

    def __init__(self, marks: list[int], per_step: int, tokenizer, tokens: int, rows: list[dict]) -> None:
        self.steps = {math.ceil(m / per_step): m for m in marks}
        self.tokenizer, self.tokens, self.rows = tokenizer, tokens, rows
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if state.global_step in self.steps:
            seconds = time.perf_counter() - self.started
            mark = self.steps[state.global_step]
            self.rows.append(
                {"tokens": mark, "seconds": seconds, **held_out(model, self.tokenizer, self.tokens)}
            )


def curve(
    checkpoint: Path, model_cfg, heal: str, marks: list[int], sets: list[str], tokens: int, out: Path
) -> dict:
    import shrink
    from shrink.heal.recover import heal as run_heal
    from shrink.heal.teacher_cache import dense_teacher
    from shrink.heal.trainer import heal_steps
    from shrink.models import build_adapter

    cfg = compose_config(f"heal={heal}", f"heal.tokens={max(marks)}", *sets)
    model, tokenizer = shrink.load(checkpoint), shrink.load_tokenizer(checkpoint)
    rows = [{"tokens": 0, "seconds": 0.0, **held_out(model, tokenizer, tokens)}]
    teacher, identity = dense_teacher(model_cfg, torch.float32, 0)
    _, per_step = heal_steps(cfg.heal)
    work = out / "work" / "-".join([checkpoint.parent.name, heal, *sets])
    shutil.rmtree(work, ignore_errors=True)  # a curve starts afresh: no checkpoint of another config
    summary = run_heal(
        build_adapter(model), tokenizer, teacher, cfg.heal, False, torch.device("cpu"), work / "checkpoints",
        work / "heal.jsonl", callbacks=[Marks(marks, per_step, tokenizer, tokens, rows)],
        teacher_identity=identity,
    )  # fmt: skip
    return {"heal": heal, "config": sets, "summary": summary, "points": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["id", "svdllm"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    parser.add_argument("--heals", nargs="+", default=["lora", "kd"], choices=["lora", "kd"])
    parser.add_argument("--marks", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--set", nargs="*", default=[], help="more heal overrides, e.g. heal.lr=5e-4")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heal")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    model_cfg = compose_config(f"model={args.model}").model
    for method in args.methods:
        for budget in args.budgets:
            checkpoint = compressed(args.out, args.model, method, budget)
            for heal in args.heals:
                key = f"{method}-b{budget}-{heal}" + "".join(f"-{s}" for s in args.set)
                if key in results:
                    continue
                results[key] = {"method": method, "budget": budget} | curve(
                    checkpoint, model_cfg, heal, args.marks, args.set, args.tokens, args.out
                )
                results_path.write_text(json.dumps(results, indent=1))
    print(table(results))
    (args.out / "heal.md").write_text(table(results) + "\n")
    plot(results, args.out / "heal.png")


def table(results: dict[str, Any]) -> str:
    lines = [
        "| method | budget | heal | tokens | wiki ppl | C4 ppl | heal s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        for p in r["points"]:
            heal = " ".join([r["heal"], *r["config"]])
            lines.append(
                f"| {r['method']} | {r['budget']} | {heal} | {p['tokens']} | {p['wiki']:.2f} | "
                f"{p['c4-sample']:.2f} | {p['seconds']:.0f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, corpus in zip(axes, CORPORA, strict=True):
        for r in results.values():
            xs = [p["tokens"] / 1000 for p in r["points"]]
            ax.plot(
                xs,
                [p[corpus] for p in r["points"]],
                marker="o",
                label=f"{r['method']} {r['budget']} {r['heal']}",
            )
        ax.set_xlabel("heal tokens (thousands)")
        ax.set_ylabel(f"{corpus} held-out ppl")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
