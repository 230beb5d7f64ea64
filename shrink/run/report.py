"""Collect `metrics.json` across run folders into one table (Markdown and CSV) and a plot of
perplexity against budget, one line per method and schedule.

    python -m shrink report outputs/ multirun/ --out report/

Folders are searched recursively. A run whose `metrics.json` has `status: failed` is listed as
failed with its error; a run folder without `metrics.json` is listed as running (its lock is
held) or unfinished (killed); one whose `metrics.json` cannot be read, as corrupt.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .lock import LOCK_FILE, is_locked

COLUMNS = [
    "model",
    "method",
    "schedule",
    "budget",
    "achieved",
    "ppl_dense",
    "ppl",
    "zeroshot_dense",
    "zeroshot",
    "glue_task",
    "glue_dense",
    "glue",
    "compress_s",
    "status",
    "folder",
]


def find_runs(folders: list[Path]) -> list[Path]:
    """Every run folder's `metrics.json` path (which may not exist): a run folder has a
    metrics.json or the lock every run takes (older runs: config.yaml beside Hydra's log)."""
    found = set()
    for folder in map(Path, folders):
        found |= {p.parent.resolve() for p in folder.rglob("metrics.json")}
        found |= {p.parent.resolve() for p in folder.rglob(LOCK_FILE)}
        found |= {
            p.parent.resolve() for p in folder.rglob("launch.log") if (p.parent / "config.yaml").exists()
        }
    return sorted(f / "metrics.json" for f in found)


def _incomplete_row(path: Path, status: str) -> dict[str, Any]:
    """A run without readable metrics: what its config.yaml says it was, and its state."""
    try:
        cfg = yaml.safe_load((path.parent / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    row: dict[str, Any] = {k: (cfg.get(k) or {}).get("name") for k in ("model", "method", "schedule")}
    return row | {"budget": cfg.get("budget"), "status": status, "folder": str(path.parent)}


def row_of(path: Path) -> dict[str, Any]:
    """One table row from a run's `metrics.json` (the first perplexity corpus; the zero-shot mean;
    the first GLUE task)."""
    if not path.exists():
        return _incomplete_row(path, "running" if is_locked(path.parent) else "unfinished (no metrics.json)")
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return _incomplete_row(path, f"corrupt metrics.json: {err}")
    row: dict[str, Any] = {k: m.get(k) for k in ("model", "method", "schedule", "budget")}
    row["status"] = m.get("status", "ok") if m.get("status") != "failed" else f"failed: {m.get('error', '?')}"
    row["achieved"] = m.get("budget_achieved")
    row["compress_s"] = m.get("compress_seconds")
    evals = m.get("eval", {})
    ppl = next(iter(evals.get("ppl", {}).values()), {})
    row["ppl_dense"], row["ppl"] = ppl.get("dense"), ppl.get("compressed")
    mean = evals.get("zeroshot", {}).get("mean", {})
    row["zeroshot_dense"], row["zeroshot"] = mean.get("dense"), mean.get("compressed")
    glue = {t: r for t, r in evals.get("glue", {}).items() if t != "cosine"}
    if glue:  # the first GLUE task scored (eval=glue-hub scores one), with its metric
        task, r = next(iter(glue.items()))
        row["glue_task"] = f"{task} ({r.get('metric')})"
        row["glue_dense"], row["glue"] = r.get("dense"), r.get("compressed")
    row["folder"] = str(path.parent)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity vs budget, one line per (model, method, schedule); log scale; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[str, list[tuple[float, float]]] = {}
    dense = {}
    for r in rows:
        if r.get("ppl") is None or r["status"] != "ok":
            continue
        lines.setdefault(f"{r['model']} {r['method']} {r['schedule']}", []).append((r["budget"], r["ppl"]))
        if r["ppl_dense"] is not None:
            dense[r["model"]] = r["ppl_dense"]
    for label, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    for model, value in dense.items():
        ax.axhline(value, linestyle="--", color="grey", linewidth=1, label=f"{model} dense")
    ax.set(xlabel="budget (fraction of block weights kept)", ylabel="perplexity", yscale="log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(folders: list[Path], out: Path | None = None) -> list[dict[str, Any]]:
    rows = [row_of(p) for p in find_runs(folders)]
    rows.sort(key=lambda r: (str(r["model"]), str(r["method"]), str(r["schedule"]), -float(r["budget"] or 0)))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(markdown(rows) + "\n")
        write_csv(rows, out / "report.csv")
        plot(rows, out / "ppl_vs_budget.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shrink report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or folders holding them")
    parser.add_argument("--out", type=Path, help="write report.md, report.csv and ppl_vs_budget.png here")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.exists()]
    if missing:
        print(f"error: no such folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = report(args.folders, args.out)
    if not rows:
        print(f"error: no metrics.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
