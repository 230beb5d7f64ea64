"""Compare methods and schedules: perplexity, compression time, peak memory and CPU latency per budget.

For every (method, schedule, budget) it runs the launcher (skipping runs whose metrics.json
exists, so an interrupted bench resumes; a run that fails is reported with its error line), then
times the saved checkpoint's forward pass against the dense model's, next to their MAC ratio,
and writes a Markdown table and a JSON file. Compression time is also given as a multiple of one
dense forward pass over the calibration set, and the run's peak RSS as a multiple of the fp32 model
size. A run is `method:schedule[:override,...]`; `python -m shrink report <out>` plots
perplexity against budget from the same folders.

    .venv/bin/python bench/compare.py                        # id vs svd on SmolLM2-135M (README)
    .venv/bin/python bench/compare.py --runs rom:uniform svdllm:last_k:schedule.k=20 --out bench/results/lr
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shrink  # noqa: E402
from shrink.data import corpora as data  # noqa: E402
from shrink.evaluation.speed import latency, macs_per_token  # noqa: E402
from shrink.hardware.devices import resolve_device  # noqa: E402
from shrink.models import load_model  # noqa: E402


def launch(out: Path, model: str, run: str, budget: float, tokens: int) -> dict:
    """Metrics of one run (launching it unless it finished before), or {"error": last stderr line}."""
    method, schedule, *extra = run.split(":")
    overrides = [o for group in extra for o in group.split(",") if o]
    folder = out / "-".join([method, schedule, *overrides, f"b{budget}"]).replace("=", "")
    previous = folder / "metrics.json"
    if not previous.exists() or json.loads(previous.read_text()).get("status") != "ok":
        cmd = [
            sys.executable, str(ROOT / "launch.py"), f"model={model}", f"method={method}",
            f"schedule={schedule}", f"budget={budget}", "logger=none", "eval=ppl",
            f"eval.ppl.max_tokens={tokens}", f"hydra.run.dir={folder}", "resume=true", *overrides,
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            return {"run": run, "budget": budget, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads((folder / "metrics.json").read_text()) | {"folder": str(folder), "run": run}


@torch.no_grad()
def calibration_forward_seconds(model, tokenizer, cfg) -> float:
    windows = data.calibration_windows(cfg.calib.corpus, tokenizer, cfg.calib.nsamples, cfg.calib.seq_len, 0)
    start = time.perf_counter()
    for i in range(0, len(windows), cfg.calib.batch_size):
        model(input_ids=windows[i : i + cfg.calib.batch_size], use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.5])
    parser.add_argument("--runs", nargs="+", default=["id:uniform", "id:greedy", "svd:uniform"])
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens for perplexity")
    parser.add_argument("--seq-len", type=int, default=512, help="latency: tokens per forward")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "id_vs_svd")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    results = []
    for budget in args.budgets:
        for run in args.runs:
            results.append(launch(args.out, args.model, run, budget, args.tokens))
    done = [m for m in results if "error" not in m]
    if not done:
        raise SystemExit("every run failed: " + "; ".join(m["error"] for m in results))

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(done[0]["folder"]) / "config.yaml")
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model(cfg.model, torch.float32)
    dense = loaded.model.to(resolve_device("cpu"))
    ids = torch.randint(
        0, dense.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    dense_s = float("nan") if args.no_latency else latency(dense, ids, args.repeats).median
    dense_blocks, dense_all = macs_per_token(dense, args.seq_len)
    forward_s = calibration_forward_seconds(dense, loaded.tokenizer, cfg)
    rows = []
    for m in results:
        if "error" in m:
            rows.append({"run": m["run"], "budget": m["budget"], "error": m["error"]})
            continue
        model = shrink.load(Path(m["folder"]) / "model")
        blocks, whole = macs_per_token(model, args.seq_len)
        seconds = float("nan") if args.no_latency else latency(model, ids, args.repeats).median
        ppl = m["eval"]["ppl"]["wiki"]
        rows.append(
            {
                "run": m["run"],
                "method": m["method"],
                "schedule": m["schedule"],
                "budget": m["budget"],
                "achieved": m["budget_achieved"],
                "ppl_dense": ppl["dense"],
                "ppl": ppl["compressed"],
                "compress_s": m["compress_seconds"],
                "compress_x_forward": m["compress_seconds"] / forward_s,
                "peak_rss_mb": m["peak_rss_mb"],
                "rss_x_fp32": m["peak_rss_mb"] * 2**20 / (4 * m["params_dense"]),
                "latency_ms": 1000 * seconds,
                "speedup": dense_s / seconds,
                "block_mac_ratio": blocks / dense_blocks,
                "model_mac_ratio": whole / dense_all,
            }
        )
        del model
    meta = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "latency_seq_len": args.seq_len,
        "dense_latency_ms": 1000 * dense_s,
        "calibration_forward_s": forward_s,
        "eval_tokens": args.tokens,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    dense_ppl = next(r["ppl_dense"] for r in rows if "error" not in r)
    lines = [
        f"{args.model}, held-out wiki ppl ({args.tokens} tokens, dense {dense_ppl:.2f}); "
        f"latency: batch 1 × {args.seq_len} tokens, {meta['threads']} CPU threads, dense "
        f"{meta['dense_latency_ms']:.0f} ms; one dense forward over the calibration set: {forward_s:.1f} s",
        "",
        "| run | budget | achieved | ppl | compress s (× fwd) | peak RSS MB (× fp32 model) | latency ms "
        "| speedup | block MAC ratio | model MAC ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['budget']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {r['run']} | {r['budget']} | {r['achieved']:.4f} | {r['ppl']:.4g} "
            f"| {r['compress_s']:.0f} ({r['compress_x_forward']:.0f}×) "
            f"| {r['peak_rss_mb']:.0f} ({r['rss_x_fp32']:.1f}×) | {r['latency_ms']:.0f} "
            f"| {r['speedup']:.2f}× | {r['block_mac_ratio']:.3f} | {r['model_mac_ratio']:.3f} |"
        )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
