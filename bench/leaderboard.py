"""Every method of shrink on one protocol: the same model, calibration text, budget accounting and
evaluation (`eval=leaderboard`: held-out perplexity of the offline Wikipedia text and C4 sample,
the first 100 items of PIQA, ARC-Easy and HellaSwag, forward and decode latency).

Each (method, budget) is one run of the launcher with the method's own defaults (its schedule
included); a run whose metrics.json says ok is reused, so an interrupted leaderboard resumes,
and a run that fails is listed with its error line. Writes `leaderboard.md` (the table),
`results.json` and `leaderboard.png` (perplexity against the achieved budget, both corpora).

    .venv/bin/python bench/leaderboard.py                                  # every method, 0.8 and 0.5
    .venv/bin/python bench/leaderboard.py --methods id flap --budgets 0.9 0.7 --out /tmp/lb
    .venv/bin/python bench/leaderboard.py --finished          # the table of what has finished
    .venv/bin/python bench/leaderboard.py --methods id --budgets 0.5 --heal heal=kd   # a "+heal" column

Timings are taken while nothing else runs (two cores: a second job beside it spoils them);
speedups beyond what the MAC counts allow are marked `*` (`eval.speed.*_reliable: false`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# the methods in the order of the table; the overrides a method needs beyond its name (none: each
# runs with its own defaults, as a user who types `method=<name>` gets it)
METHODS: dict[str, list[str]] = {
    "id": [],
    "svd": [],
    "rom": [],
    "svdllm": [],
    "distill": [],
    "flap": [],
    "wanda-sp": [],
    "llm-pruner": [],
    "slicegpt": [],
    "shortgpt": [],
}


def run(
    out: Path, model: str, method: str, budget: float, launch: bool = True, heal: list[str] | None = None
) -> dict[str, Any] | None:
    """The run's table row, launching it unless it finished before (or, without `launch`, None).
    `heal`: the heal overrides of the "+heal" run (`heal=kd`, …), in a folder of its own."""
    folder = out / "-".join([f"{method}-b{budget}", *(h.replace("=", "-") for h in heal or [])])
    metrics = folder / "metrics.json"
    if not metrics.exists() or json.loads(metrics.read_text()).get("status") != "ok":
        if not launch:
            return None
        cmd = [
            sys.executable, str(ROOT / "launch.py"), f"model={model}", f"method={method}", f"budget={budget}",
            "eval=leaderboard", "logger=none", "save_model=false", f"hydra.run.dir={folder}", "resume=true",
            *METHODS[method], *(heal or []),
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            return {"method": method, "budget": budget, "error": lines[-1] if lines else "failed"}
    return row(json.loads(metrics.read_text()))


def row(m: dict[str, Any]) -> dict[str, Any]:
    ppl, ev = m["eval"]["ppl"], m["eval"]
    mean = ev.get("zeroshot", {}).get("mean", {})
    speed = ev.get("speed", {})
    return {
        "method": m["method"],
        "schedule": m["schedule"],
        "budget": m["budget"],
        "achieved": m["budget_achieved"],
        "wiki": ppl["wiki"]["compressed"],
        "wiki_x": ppl["wiki"]["compressed"] / ppl["wiki"]["dense"],
        "c4": ppl["c4-sample"]["compressed"],
        "c4_x": ppl["c4-sample"]["compressed"] / ppl["c4-sample"]["dense"],
        "dense": {k: v["dense"] for k, v in ppl.items()} | {"zeroshot": mean.get("dense")},
        "zeroshot": mean.get("compressed"),
        "compress_s": m["compress_seconds"],
        "speedup": speed.get("speedup"),
        "speedup_reliable": speed.get("speedup_reliable", True),
        "decode_speedup": speed.get("decode_speedup"),
        "decode_speedup_reliable": speed.get("decode_speedup_reliable", True),
        "mac_ratio": speed.get("model_mac_ratio"),
    }


def _times(value: float | None, reliable: bool) -> str:
    return "—" if value is None else f"{value:.2f}×" + ("" if reliable else "*")


def _healed(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return f"error: {r['error']}"
    zeroshot = "—" if r["zeroshot"] is None else f"{r['zeroshot']:.3f}"
    return f"{r['wiki']:.4g} / {r['c4']:.4g} / {zeroshot}"


def table(rows: list[dict[str, Any]], model: str, healed: dict[tuple[str, float], Any] | None = None) -> str:
    """One line per run; with `healed` ((method, budget) → the "+heal" run's row, or None), a last
    column with that run's wiki / C4 / zero-shot mean."""
    dense = next((r["dense"] for r in rows if "error" not in r), {})
    extra = healed is not None and any(v is not None for v in healed.values())
    lines = [
        f"{model}; dense: wiki {dense.get('wiki', 0):.2f}, C4 {dense.get('c4-sample', 0):.2f}, "
        f"zero-shot mean {dense.get('zeroshot') or 0:.3f}",
        "",
        "| budget | method (schedule) | achieved | wiki ppl (×dense) | C4 ppl (×dense) | zero-shot mean | "
        "compress s | forward speedup | decode speedup |"
        + (" +heal: wiki / C4 / zero-shot |" if extra else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['budget']} | {r['method']} | error: {r['error']} ||||||")
            continue
        zeroshot = "—" if r["zeroshot"] is None else f"{r['zeroshot']:.3f}"
        lines.append(
            f"| {r['budget']} | {r['method']} ({r['schedule']}) | {r['achieved']:.4f} | "
            f"{r['wiki']:.4g} ({r['wiki_x']:.3g}) | {r['c4']:.4g} ({r['c4_x']:.3g}) | {zeroshot} | "
            f"{r['compress_s']:.0f} | {_times(r['speedup'], r['speedup_reliable'])} | "
            f"{_times(r['decode_speedup'], r['decode_speedup_reliable'])} |"
            + (f" {_healed(healed.get((r['method'], r['budget'])))} |" if extra else "")
        )
    return "\n".join(lines)


CLIP = 1000.0  # perplexity multiples above this are drawn at it (plain SVD reaches 10⁶)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity (×dense, log scale) against the achieved budget, one line per method, one panel
    per corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    done = [r for r in rows if "error" not in r]
    for ax, (key, name) in zip(axes, [("wiki_x", "held-out Wikipedia"), ("c4_x", "C4 sample")], strict=True):
        for method in dict.fromkeys(r["method"] for r in done):
            points = sorted((r["achieved"], min(r[key], CLIP)) for r in done if r["method"] == method)
            (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=method)
            clipped = [p for p in points if p[1] >= CLIP]
            if clipped:  # drawn at the top edge, as a triangle
                ax.plot(*zip(*clipped, strict=True), marker="^", markersize=10, color=line.get_color())
        ax.set(title=name, xlabel="achieved budget (fraction of block weights kept)", yscale="log")
        ax.axhline(1.0, linestyle="--", color="grey", linewidth=1)
    axes[0].set_ylabel("perplexity / dense")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "leaderboard")
    parser.add_argument("--finished", action="store_true", help="launch nothing: tabulate the finished runs")
    parser.add_argument(
        "--heal",
        nargs="*",
        default=None,
        help="also a +heal run of each, with these overrides (e.g. heal=kd)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    found = [run(args.out, args.model, m, b, not args.finished) for b in args.budgets for m in args.methods]
    rows = [r for r in found if r is not None]
    healed = None
    if args.heal:
        healed = {
            (m, b): run(args.out, args.model, m, b, not args.finished, args.heal)
            for b in args.budgets
            for m in args.methods
        }
    (args.out / "results.json").write_text(
        json.dumps(
            rows + [r | {"heal": args.heal} for r in (healed or {}).values() if r is not None], indent=1
        )
    )
    text = table(rows, args.model, healed)
    (args.out / "leaderboard.md").write_text(text + "\n")
    if any("error" not in r for r in rows):
        plot(rows, args.out / "leaderboard.png")
    print(text)


if __name__ == "__main__":
    main()
