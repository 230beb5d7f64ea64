"""Structure, sparsity and quantization stacked (issue 17): held-out perplexity per combination.

Each row is one run of `launch.py` on the default model and calibration, evaluated on 8192
held-out tokens of the offline Wikipedia text and of the offline C4 sample; `bits/w` is the
block linears' bits per weight in the packed checkpoint (weights, plus a float32 scale per group
of 64), `zeros` their share of zero weights, `MB` the whole checkpoint folder (the float32
embedding, 108 MB of the dense folder's 517, is not quantized). Runs whose metrics.json exists are reused.
SmolLM2-135M's packaged weights were Q4_1 with groups of 32 before dequantisation, so 4-bit groups
of 32 would show a near-zero error; 128 does not divide its width of 576 (a packed group is
whole): the rows use groups of 64.

    .venv/bin/python bench/trinity.py
    .venv/bin/python bench/trinity.py --rows dense gptq4 id0.8+gptq4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DENSE = ["method=id", "budget=1.0", "schedule=uniform"]  # keeps every weight: the steps alone
ID = ["method=id", "budget=0.8"]
G = "quant.group_size=64"
G4 = ["quant=gptq", "quant.bits=4", G]
S24 = ["sparsity=sparsegpt", "sparsity.pattern=2:4"]
ROWS: dict[str, list[str]] = {
    "dense": DENSE,
    "rtn8": [*DENSE, "quant=rtn", "quant.bits=8", G],
    "gptq8": [*DENSE, "quant=gptq", "quant.bits=8", G, "quant.act_order=false"],
    "rtn4": [*DENSE, "quant=rtn", "quant.bits=4", G],
    "gptq4": [*DENSE, *G4],
    "gptq4-noact": [*DENSE, *G4, "quant.act_order=false"],  # columns in their own order
    "id0.8": ID,
    "id0.8+rtn4": [*ID, "quant=rtn", "quant.bits=4", G],
    "id0.8+gptq4": [*ID, *G4],
    "gptq4-gptaq": [*DENSE, *G4, "quant.target=dense"],
    "id0.8+gptq4-gptaq": [*ID, *G4, "quant.target=dense"],
    "id0.8+gptq4+lr16": [*ID, *G4, "quant.lowrank=16"],  # corrections inside the same 0.8
    "wanda2:4": [*DENSE, "sparsity=wanda", "sparsity.pattern=2:4"],
    "sparsegpt2:4": [*DENSE, *S24],
    "sparsegpt2:4+gptq4": [*DENSE, *S24, *G4],
    "id0.8+sparsegpt2:4+gptq4": [*ID, *S24, *G4],
}


def run(out: Path, model: str, row: str, tokens: int) -> dict:
    folder = out / row
    metrics = folder / "metrics.json"
    if not metrics.exists() or json.loads(metrics.read_text()).get("status") != "ok":
        cmd = [
            sys.executable, str(ROOT / "launch.py"), f"model={model}", "logger=none", "eval=ppl",
            "eval.ppl.corpora=[wiki,c4-sample]", f"eval.ppl.max_tokens={tokens}", "save_model=true",
            f"hydra.run.dir={folder}", "resume=true", *ROWS[row],
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            return {"row": row, "error": lines[-1] if lines else "failed"}
    m = json.loads(metrics.read_text())
    ppl = m["eval"]["ppl"]
    return {
        "row": row,
        "achieved": m["budget_achieved"],
        "wiki": ppl["wiki"]["compressed"],
        "c4": ppl["c4-sample"]["compressed"],
        "dense": {k: v["dense"] for k, v in ppl.items()},
        "bits": m.get("block_bits_per_weight"),
        "zeros": m.get("block_zero_fraction"),
        "compress_s": m["compress_seconds"],
        "mb": m["checkpoint_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trinity")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(args.out, args.model, r, args.tokens) for r in args.rows]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("| row | kept params | bits/w | zeros | MB | wiki ppl | C4 ppl | compress s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | error: {r['error']} |||||||")
            continue
        bits = f"{r['bits']:.2f}" if r["bits"] is not None else "32"
        zeros = f"{r['zeros']:.3f}" if r["zeros"] is not None else "–"
        print(
            f"| {r['row']} | {r['achieved']:.3f} | {bits} | {zeros} | {r['mb']:.0f} | {r['wiki']:.2f} | "
            f"{r['c4']:.2f} | "
            f"{r['compress_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
