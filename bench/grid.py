"""Perplexity grid (run × budget) of every finished run under a bench folder, as Markdown.

.venv/bin/python bench/grid.py bench/results/lowrank
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: Path) -> str:
    cells: dict[str, dict[float, str]] = {}
    dense = None
    for path in sorted(folder.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        ppl = m["eval"]["ppl"]["wiki"]
        dense = ppl["dense"]
        run = path.parent.name.rsplit("-b", 1)[0]
        cells.setdefault(run, {})[m["budget"]] = f"{ppl['compressed']:.4g} ({m['budget_achieved']:.3f})"
    budgets = sorted({b for row in cells.values() for b in row}, reverse=True)
    lines = [
        f"held-out ppl (achieved budget); dense {dense:.2f}",
        "",
        "| run | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for run, row in sorted(cells.items()):
        lines.append(f"| {run} | " + " | ".join(row.get(b, "—") for b in budgets) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
