"""Thin against zero-padded attention: a saved run's checkpoint as it loads (its thinned heads
computing at their kept widths) and the same checkpoint with its heads padded back to head_dim,
beside the dense model, at each context: prefill latency over the whole context, greedy-decode
ms per token once the context is full, KV-cache bytes, and the MAC ratio that bounds the prefill
speedup. Each model is timed as `eval=speed` times it (`shrink.evaluation.speed.measure`), the
three in turn for `--rounds` rounds, each keeping its fastest round (a busy moment only slows).

    .venv/bin/python bench/attention.py /tmp/id05                      # contexts 512 and 2048
    .venv/bin/python bench/attention.py RUN --contexts 2048 --repeats 5 --out bench/results/attention.json
    .venv/bin/python bench/attention.py RUN --contexts 512 --breakdown   # where the time goes
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shrink.checkpoints.save_load import load  # noqa: E402
from shrink.evaluation.speed import measure  # noqa: E402
from shrink.modeling_shrink import padded_attention  # noqa: E402
from shrink.models import load_model  # noqa: E402
from shrink.run.plugins import load_plugins  # noqa: E402

DECODE_TOKENS = 32


def models(run: Path) -> dict[str, torch.nn.Module]:
    """dense (the run's model config), thin (the checkpoint as it loads), padded (its copy with
    every thin attention padded back)."""
    cfg = OmegaConf.load(run / "config.yaml")
    dense = load_model(cfg.model, torch.float32, seed=int(cfg.seed)).model.eval()
    thin = load(run / "model").eval()
    padded = copy.deepcopy(thin)
    for module in padded.modules():
        padded_attention(module)
    return {"dense": dense, "thin": thin, "padded": padded}


def fastest(best: dict | None, values: dict) -> dict:
    """Per timing, the faster of two rounds (a busy moment slows a round; nothing speeds one)."""
    if best is None:
        return values
    merged = dict(values)
    for key in ("latency_ms", "decode_ms_per_token"):
        merged[key] = min(best[key], values[key])
    return merged


def row(name: str, context: int, values: dict, dense: dict) -> dict:
    return {
        "model": name,
        "context": context,
        "prefill_ms": values["latency_ms"],
        "prefill_speedup": dense["latency_ms"] / values["latency_ms"],
        "mac_bound": dense["model_macs_per_token"] / values["model_macs_per_token"],
        "decode_ms_per_token": values["decode_ms_per_token"],
        "decode_speedup": dense["decode_ms_per_token"] / values["decode_ms_per_token"],
        "kv_cache_mb": values["kv_cache_bytes"] / 2**20,
        "kv_cache_ratio": values["kv_cache_bytes"] / dense["kv_cache_bytes"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | context | prefill ms | speedup | MAC bound | decode ms/token | speedup "
        "| KV cache MB | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['context']} | {r['prefill_ms']:.0f} | {r['prefill_speedup']:.2f}× | "
            f"{r['mac_bound']:.2f}× | {r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f}× | "
            f"{r['kv_cache_mb']:.1f} | {r['kv_cache_ratio']:.3f} |"
        )
    return "\n".join(lines)


KINDS = ("block GEMMs", "attention kernel", "LM head", "the rest")


def _kind(name: str, shapes: list, vocab: int) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention kernel"
    if name in ("aten::mm", "aten::addmm"):
        weight = shapes[-1] if shapes else []
        return "LM head" if weight and weight[-1] == vocab else "block GEMMs"
    return "the rest"


def _gemm_macs(name: str, shapes: list) -> int:
    if name not in ("aten::mm", "aten::addmm") or len(shapes) < 2:
        return 0
    (rows, inner), (_, cols) = shapes[-2], shapes[-1]
    return rows * inner * cols


@torch.inference_mode()
def breakdown(model: torch.nn.Module, context: int, rounds: int) -> dict[str, float]:
    """Milliseconds of one forward over `context` tokens by kind of work (each op's own CPU time
    from torch's profiler, the median over `rounds`), and the block GEMMs' multiply-adds: whether
    the GEMMs shrink with their MACs, and how much of the time is work no pruning of the
    projections touches (the attention kernel, the LM head, norms and activations)."""
    from torch.profiler import ProfilerActivity, profile

    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, use_cache=False)  # warm-up
    timed: dict[str, list[float]] = {kind: [] for kind in KINDS}
    macs = 0  # the same in every round
    for _ in range(rounds):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(input_ids=ids, use_cache=False)
        totals = dict.fromkeys(KINDS, 0.0)
        macs = 0
        for event in prof.key_averages(group_by_input_shape=True):
            shapes = [s for s in event.input_shapes if s]
            kind = _kind(event.key, shapes, vocab)
            totals[kind] += event.self_cpu_time_total / 1000
            if kind == "block GEMMs":
                macs += _gemm_macs(event.key, shapes) * event.count
        for kind, ms in totals.items():
            timed[kind].append(ms)
    result = {kind: float(np.median(values)) for kind, values in timed.items()}
    result["block_gemm_gmacs"] = macs / 1e9
    return result


def breakdown_table(rows: dict[str, dict[str, float]]) -> str:
    dense = rows["dense"]
    lines = [
        "| model | " + " | ".join(f"{k} ms" for k in KINDS) + " | total ms | block GEMM time ratio "
        "| block GEMM MAC ratio |",
        "|---|" + "---|" * (len(KINDS) + 3),
    ]
    for name, r in rows.items():
        total = sum(r[k] for k in KINDS)
        lines.append(
            f"| {name} | " + " | ".join(f"{r[k]:.0f}" for k in KINDS) + f" | {total:.0f} | "
            f"{r['block GEMMs'] / dense['block GEMMs']:.3f} | "
            f"{r['block_gemm_gmacs'] / dense['block_gemm_gmacs']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with a saved model/")
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="timings per model, taken in turn")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each forward by kind of work (torch's profiler)"
    )
    args = parser.parse_args()
    load_plugins()
    cpu = torch.device("cpu")
    rows = []
    for run in args.runs:
        timed = models(run)
        for context in args.contexts:
            results: dict[str, dict] = {}
            for _ in range(args.rounds):  # the models in turn, each keeping its fastest round
                for name, model in timed.items():
                    prompt = context - DECODE_TOKENS  # the context is full at the last decoded token
                    values = measure(
                        model, 1, context, args.repeats, args.warmup, cpu, seed=0,
                        decode_tokens=DECODE_TOKENS, prompt_len=prompt, desc=f"{name} at {context}",
                    )  # fmt: skip
                    results[name] = fastest(results.get(name), values)
            for name, values in results.items():
                rows.append({"run": str(run), **row(name, context, values, results["dense"])})
            print(table([r for r in rows if r["run"] == str(run) and "breakdown" not in r]), flush=True)
            if args.breakdown:
                parts = {name: breakdown(model, context, args.repeats) for name, model in timed.items()}
                for name, part in parts.items():
                    rows.append({"run": str(run), "model": name, "context": context, "breakdown": part})
                print(breakdown_table(parts), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
