"""Structure, sparsity and quantization stacked: held-out perplexity per combination.

Each row is one run of `launch.py` on the default model and calibration, evaluated on 8192
held-out tokens of the offline Wikipedia text and of the offline C4 sample; `bits/w` is the
block linears' bits per weight in the packed checkpoint (weights, plus a float32 scale per group
of 64), `zeros` their share of zero weights, `MB` the whole checkpoint folder (the float32
embedding, 108 MB of the dense folder's 517, is not quantized). Runs whose metrics.json exists are reused.
SmolLM2-135M's packaged weights were Q4_1 with groups of 32 before dequantisation, so 4-bit groups
of 32 would show a near-zero error; 128 does not divide its width of 576 (a packed group is
whole): the rows use groups of 64.

With `--speed` it then loads each row's saved checkpoint (`shrink.load`) and times it on this
machine as `eval=speed` does: a forward over 512 tokens and greedy decoding (ms per token after a
32-token prompt, batch 1), with the float linears and again with the quantized ones on torch's
weight-only integer kernels (`shrink/quantization/kernels.py`), next to the weight bytes in memory. Time on an
idle machine: the rows run one after another in this process.

    .venv/bin/python bench/trinity.py
    .venv/bin/python bench/trinity.py --rows dense gptq4 id0.8+gptq4
    .venv/bin/python bench/trinity.py --rows dense rtn8 gptq4 id0.8 id0.8+gptq4 --speed
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
ASYM_CLIP = ["quant.sym=false", "quant.clip=true"]  # zero points and searched ranges
S24 = ["sparsity=sparsegpt", "sparsity.pattern=2:4"]
ROWS: dict[str, list[str]] = {
    "dense": DENSE,
    "rtn8": [*DENSE, "quant=rtn", "quant.bits=8", G],
    "rtn8-row": [*DENSE, "quant=rtn", "quant.bits=8", "quant.group_size=-1"],  # one scale per row
    "gptq8": [*DENSE, "quant=gptq", "quant.bits=8", G, "quant.act_order=false"],
    "rtn4": [*DENSE, "quant=rtn", "quant.bits=4", G],
    "gptq4": [*DENSE, *G4],
    "gptq4-noact": [*DENSE, *G4, "quant.act_order=false"],  # columns in their own order
    "id0.8": ID,
    "id0.8+rtn4": [*ID, "quant=rtn", "quant.bits=4", G],
    "id0.8+gptq4": [*ID, *G4],
    "gptq4-gptaq": [*DENSE, *G4, "quant.target=dense"],  # closed-form target, α = 0.25
    "gptq4-gptaq-recursion": [*DENSE, *G4, "quant.target=dense", "quant.gptaq_form=recursion"],
    "id0.8+gptq4-gptaq": [*ID, *G4, "quant.target=dense"],
    "id0.8+gptq4-gptaq-recursion": [*ID, *G4, "quant.target=dense", "quant.gptaq_form=recursion"],
    "gptq4-gptaq-asym": [*DENSE, *G4, "quant.target=dense", "quant.sym=false"],  # zero points
    "id0.8+gptq4-gptaq-asym": [*ID, *G4, "quant.target=dense", "quant.sym=false"],
    "gptq4-gptaq-clip": [*DENSE, *G4, "quant.target=dense", "quant.clip=true"],  # searched ranges
    "id0.8+gptq4-gptaq-clip": [*ID, *G4, "quant.target=dense", "quant.clip=true"],
    "id0.8+gptq4-gptaq-asym-clip": [*ID, *G4, "quant.target=dense", "quant.sym=false", "quant.clip=true"],
    "gptq4-refit": [*DENSE, *G4, "quant.refit=1"],  # scales refitted to the calibration inputs
    "id0.8+gptq4-refit": [*ID, *G4, "quant.refit=1"],
    "gptq4-gptaq-refit": [*DENSE, *G4, "quant.target=dense", "quant.refit=1"],
    "id0.8+gptq4-gptaq-refit": [*ID, *G4, "quant.target=dense", "quant.refit=1"],
    "gptq4-gptaq-asym-clip-refit": [*DENSE, *G4, "quant.target=dense", *ASYM_CLIP, "quant.refit=1"],
    "id0.8+gptq4-gptaq-asym-clip-refit": [*ID, *G4, "quant.target=dense", *ASYM_CLIP, "quant.refit=1"],
    "gptq4-refit4": [*DENSE, *G4, "quant.refit=4"],  # four rounds, GPTQ again on each refitted grid
    "id0.8+gptq4-refit4": [*ID, *G4, "quant.refit=4"],
    "id0.8+gptq4-gptaq-asym-clip-refit4": [*ID, *G4, "quant.target=dense", *ASYM_CLIP, "quant.refit=4"],
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


def speed(out: Path, rows: list[str]) -> None:
    """Time every row's checkpoint against the dense row's (see the module docstring)."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from shrink.checkpoints.save_load import load
    from shrink.evaluation.suite import measure_speed, speed_ratios

    settings = OmegaConf.create(
        {"batch_size": 1, "seq_len": 512, "repeats": 10, "warmup": 2, "seed": 0,
         "decode_tokens": 32, "prompt_len": 32, "kernels": True}
    )  # fmt: skip
    cpu = torch.device("cpu")
    table = {row: measure_speed(load(out / row / "model"), settings, cpu) for row in ["dense", *rows] if
             (out / row / "model").exists()}  # fmt: skip
    saved = out / "speed.json"  # rows timed before keep their entries
    previous = json.loads(saved.read_text()) if saved.exists() else {}
    saved.write_text(json.dumps(previous | table, indent=1))
    print(f"\nCPU, {torch.get_num_threads()} threads; forward: batch 1 × 512 tokens; decode: ms per token")
    print("| row | forward ms | decode ms | kernels | kernel forward ms | kernel decode ms | decode speedup "
          "| weight bytes ratio | logits rel diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for row, timed in table.items():
        ratios = speed_ratios({"dense": table["dense"], "compressed": timed})
        k = timed.get("kernels", {})
        fast = "latency_ms" in k
        print(
            f"| {row} | {timed['latency_ms']:.0f} | {timed['decode_ms_per_token']:.1f} | "
            f"{k.get('kernel_linears', 0)}/{k.get('quantized_linears', 0)} | "
            f"{k['latency_ms'] if fast else float('nan'):.0f} | "
            f"{k['decode_ms_per_token'] if fast else float('nan'):.1f} | "
            f"{ratios.get('kernel_decode_speedup', ratios['decode_speedup']):.2f}× | "
            f"{ratios.get('kernel_weight_bytes_ratio', ratios['weight_bytes_ratio']):.3f} | "
            f"{k.get('logits_max_rel_diff', 0):.1e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trinity")
    parser.add_argument("--speed", action="store_true", help="then time the saved checkpoints (idle machine)")
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
    if args.speed:
        speed(args.out, [r for r in args.rows if r != "dense"])


if __name__ == "__main__":
    main()
