"""The few lines a finished run prints: what was kept, the scores dense → compressed, the costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# a compressed perplexity this many times the dense one means the model is broken, not degraded
BROKEN_PPL_RATIO = 1000.0


def closing_summary(m: dict[str, Any], path: Path) -> str:
    lines = [
        f"shrink: {m['model']}  method={m['method']}  schedule={m['schedule']}  "
        f"budget={m['budget']:g} {m['budget_unit']} (achieved {m['budget_achieved']:.4f})",
        f"  params     {m['params_dense'] / 1e6:.2f}M -> {m['params_compressed'] / 1e6:.2f}M "
        f"(block linears {m['block_params_dense'] / 1e6:.2f}M -> {m['block_params_compressed'] / 1e6:.2f}M)",
    ]
    if "block_bits_per_weight" in m:
        steps = [
            f"{k}={v['name']}"
            for k, v in (("sparsity", m["sparsity"]), ("quant", m["quant"]))
            if v["name"] != "none"
        ]
        lines.append(
            f"  steps      {' '.join(steps)}: block linears at {m['block_bits_per_weight']:.2f} bits/weight, "
            f"{m['block_zero_fraction']:.1%} zeros"
            + (f"; checkpoint {m['checkpoint_mb']:.2f} MB" if m.get("checkpoint_mb") is not None else "")
        )
    heal = m.get("heal")
    if heal is not None and heal.get("steps"):
        lines.append(
            f"  heal       {heal['name']} ({heal['params']}): {heal['tokens']} tokens of {heal['corpus']} "
            f"in {heal['seconds']:.0f}s ({heal['tokens_per_second']:.0f} tokens/s), "
            f"loss {heal['loss_first']:.4f} -> {heal['loss_last']:.4f}"
        )
    for corpus, r in m["eval"].get("ppl", {}).items():
        lines.append(
            f"  ppl {corpus:<6} dense {r['dense']:.2f} -> "
            + (f"before heal {r['before_heal']:.2f} -> " if "before_heal" in r else "")
            + f"compressed {r['compressed']:.2f} "
            f"({r['tokens']} tokens, {r['seq_len']}-token windows)"
        )
        if not r["compressed"] < BROKEN_PPL_RATIO * r["dense"]:  # NaN included
            lines.append(
                f"  warning: {corpus} perplexity is over {BROKEN_PPL_RATIO:g}x dense: the compressed model "
                "is broken at this budget, not merely degraded"
            )
    zs = m["eval"].get("zeroshot", {})
    for task, r in zs.items():
        if task != "mean":
            lines.append(
                f"  {task:<15}{r['metric']} dense {r['dense']:.3f} -> compressed {r['compressed']:.3f} "
                f"(n={r['n']}, stderr {r.get('compressed_stderr') or 0:.3f})"
            )
    for task, r in m["eval"].get("glue", {}).items():
        if task == "cosine":
            lines.append(
                f"  glue cosine    compressed vs dense embeddings: mean {r['value']:.4f}, p5 {r['p5']:.4f}"
            )
        else:
            lines.append(
                f"  glue {task:<10}{r['metric']} dense {r['dense']:.4f} -> compressed {r['compressed']:.4f}"
            )
    sp = m["eval"].get("speed", {})
    if "speedup" in sp:
        dense, comp = sp["dense"], sp["compressed"]
        lines.append(
            f"  speed      {dense['latency_ms']:.0f} ± {dense.get('latency_iqr_ms', 0):.0f} ms -> "
            f"{comp['latency_ms']:.0f} ± {comp.get('latency_iqr_ms', 0):.0f} ms (median ± IQR; "
            f"{sp['speedup']:.2f}x; model MAC ratio {sp['model_mac_ratio']:.3f}, "
            f"batch {dense['batch_size']} x {dense['seq_len']} tokens)"
        )
        if not sp.get("speedup_reliable", True):
            lines.append(
                f"  warning: speedup {sp['speedup']:.2f}x exceeds 1 / MAC ratio = "
                f"{1 / sp['model_mac_ratio']:.2f}x: timing noise, not a result (time on an idle machine)"
            )
        lines += _decode_lines(sp)
    if "mean" in zs:
        lines.append(
            f"  zero-shot mean  dense {zs['mean']['dense']:.3f} -> compressed {zs['mean']['compressed']:.3f}"
        )
    lines.append(
        f"  time       load {m['load_seconds']:.1f}s  compress {m['compress_seconds']:.1f}s  "
        f"eval {m['eval_seconds']:.1f}s  total {m['total_seconds']:.1f}s  "
        f"(peak RSS {m['peak_rss_mb']:.0f} MB)"
    )
    lines.append(f"  run folder {path}")
    return "\n".join(lines)


def _decode_lines(sp: dict) -> list[str]:
    """Per-token decode latency, and the same with quantized linears on integer kernels."""
    dense, comp, lines = sp["dense"], sp["compressed"], []
    if "decode_speedup" in sp:
        lines.append(
            f"  decode     {dense['decode_ms_per_token']:.1f} -> {comp['decode_ms_per_token']:.1f} ms/token "
            f"({sp['decode_speedup']:.2f}x; weight bytes ratio {sp['weight_bytes_ratio']:.3f})"
        )
    if "kv_cache_ratio" in sp:
        mb = 2**20
        lines.append(
            f"  KV cache   {dense['kv_cache_bytes'] / mb:.1f} -> {comp['kv_cache_bytes'] / mb:.1f} MB "
            f"at {comp['seq_len']} tokens (ratio {sp['kv_cache_ratio']:.3f})"
        )
    kernels = comp.get("kernels", {})
    if "kernel_speedup" in sp:
        decode = (
            f"decode {kernels['decode_ms_per_token']:.1f} ms/token ({sp['kernel_decode_speedup']:.2f}x), "
            if "kernel_decode_speedup" in sp
            else ""
        )
        lines.append(
            f"  kernels    {kernels['kernel_linears']} of {kernels['quantized_linears']} quantized linears "
            f"on integer kernels: forward {kernels['latency_ms']:.0f} ms ({sp['kernel_speedup']:.2f}x), "
            f"{decode}"
            f"weight bytes ratio {sp['kernel_weight_bytes_ratio']:.3f}, logits max rel diff "
            f"{kernels['logits_max_rel_diff']:.1e}"
        )
    elif kernels:
        n = kernels["quantized_linears"]
        lines.append(f"  kernels    none of {n} quantized linears has a kernel here")
    for key in ("decode_speedup", "kernel_speedup", "kernel_decode_speedup"):
        if not sp.get(f"{key}_reliable", True):
            lines.append(f"  warning: {key} {sp[key]:.2f}x exceeds what fewer MACs and bytes allow: noise")
    return lines
