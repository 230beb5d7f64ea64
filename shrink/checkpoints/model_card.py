"""The model card of a run's checkpoint: `<run>/model/README.md`.

Hugging Face's metadata header (base model, library, tags, pipeline), then what a reader of the
hub page needs: how to load the folder, what was kept (budget, parameters, MACs, bits, per-block
widths), the method and its config, the calibration data, and the run's scores. Written from the
run folder's own records (config.yaml, the checkpoint's manifest, the metrics), after evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ..config import Head
from ..models.loading import AUTO_CLASSES
from .hf_folder import NOTE
from .save_load import read_manifest

PIPELINES = {
    "causal_lm": "text-generation",
    "masked_lm": "fill-mask",
    "sequence_classification": "text-classification",
}
LOW_RANK = ("svd", "rom", "svdllm", "distill")


def write(
    run: Path, metrics: dict[str, Any], folder: Path | None = None, blocks: list[dict] | None = None
) -> Path | None:
    """Write the card into `folder` (by default `run`/model; None when the run saved no
    checkpoint); `blocks`: per-block widths where the manifest has none (older checkpoints)."""
    folder = run / "model" if folder is None else folder
    if not (folder / "manifest.json").is_file():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    manifest = read_manifest(folder)
    if blocks is not None:
        manifest.setdefault("info", {}).setdefault("blocks", blocks)
    config = folder / "config.json"
    # transformers' own classes, or (auto_map) the family's class with shrink's modeling file
    stock = "stock" if config.is_file() else None
    note = None
    if stock and "auto_map" in (values := yaml.safe_load(config.read_text())):
        stock, note = "remote", values.get(NOTE)
    card = folder / "README.md"
    card.write_text(_header(cfg, manifest, stock) + _body(cfg, manifest, metrics, stock, note))
    return card


def _header(cfg: dict[str, Any], manifest: dict[str, Any], stock: str | None) -> str:
    model, method = cfg["model"], cfg["method"]["name"]
    base = model.get("base_model") or (model["path"] if model["source"] == "hub" else None)
    tags = ["shrink", "compressed", method, "low-rank" if method in LOW_RANK else "pruned"]
    tags += [f"{cfg['quant']['bits']}-bit", "compressed-tensors"] if cfg["quant"]["name"] != "none" else []
    tags += ["sparse"] if cfg["sparsity"]["name"] != "none" else []
    tags += ["custom_code"] if stock == "remote" else []
    meta = {
        **({"base_model": base} if base else {}),
        "library_name": "transformers" if stock else "shrink",
        "tags": tags,
        **({"pipeline_tag": PIPELINES[manifest["head"]]} if manifest["head"] in PIPELINES else {}),
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"


def _body(
    cfg: dict[str, Any], manifest: dict[str, Any], m: dict[str, Any], stock: str | None, note: str | None
) -> str:
    name, method = cfg["model"]["name"], cfg["method"]["name"]
    lines = [f"# {name}, compressed by shrink ({method}, budget {cfg['budget']:g} {cfg['budget_unit']})", ""]
    if note:  # the first thing a reader of a folder that needs remote code must know
        lines += [f"**{note}**", ""]
    lines += _how_to_load(manifest, stock)
    lines += ["", "## What was kept", "", "| | dense | compressed |", "|---|---|---|"]
    lines.append(
        f"| budget ({m['budget_unit']}) | 1 | {m['budget_achieved']:.4f} (requested {m['budget']:g}) |"
    )
    lines.append(f"| parameters | {m['params_dense']:,} | {m['params_compressed']:,} |")
    lines.append(
        f"| block linears' parameters | {m['block_params_dense']:,} | {m['block_params_compressed']:,} |"
    )
    lines.append(
        f"| block linears' MACs per token | {m['block_macs_dense']:,} | {m['block_macs_compressed']:,} |"
    )
    if m.get("block_bits_per_weight") is not None:
        lines.append(f"| block linears' bits per weight | – | {m['block_bits_per_weight']:.2f} |")
    if m.get("checkpoint_mb") is not None:
        lines.append(f"| checkpoint | – | {m['checkpoint_mb']:.1f} MB |")
    blocks = manifest.get("info", {}).get("blocks")
    if blocks:
        stream = any("stream" in b for b in blocks)  # a sliced residual stream (SliceGPT)
        lines += [
            "",
            "Per block:",
            "",
            "| block | FFN width | heads | KV heads | factor-pair ranks |"
            + (" stream width (in / mid / out) |" if stream else ""),
            "|---|---|---|---|---|" + ("---|" if stream else ""),
        ]
        for i, b in enumerate(blocks):
            ranks = ", ".join(f"{p} {r}" for p, r in b["ranks"].items()) or "–"
            row = f"| {i} | {b['ffn']} | {b['heads']} | {b['kv_heads']} | {ranks} |"
            if stream:
                row += " " + (" / ".join(str(w) for w in b["stream"]) if "stream" in b else "–") + " |"
            lines.append(row)
    lines += ["", "## Method and config", ""]
    lines += [
        "```yaml",
        yaml.safe_dump(
            {k: cfg[k] for k in ("method", "schedule", "quant", "sparsity")}, sort_keys=False
        ).rstrip(),
        "```",
    ]
    calib = cfg["calib"]
    lines += [
        "",
        "## Calibration",
        "",
        f"{calib['nsamples']} windows of {calib['seq_len']} tokens of `{calib['corpus']}` "
        f"(seed {cfg['seed']}), disjoint from the evaluation text.",
        "",
        "## Evaluation",
        "",
    ]
    scores = m.get("eval", {})
    if scores.get("ppl"):
        lines += ["| perplexity | dense | compressed | tokens |", "|---|---|---|---|"]
        for corpus, r in scores["ppl"].items():
            lines.append(f"| {corpus} | {r['dense']:.2f} | {r['compressed']:.2f} | {r['tokens']} |")
        lines.append("")
    tasks = {k: v for k, v in scores.get("zeroshot", {}).items() if k != "mean"}
    if tasks:
        lines += ["| zero-shot task | metric | dense | compressed |", "|---|---|---|---|"]
        for task, r in tasks.items():
            lines.append(f"| {task} | {r['metric']} | {r['dense']:.4f} | {r['compressed']:.4f} |")
        lines.append("")
    if not scores.get("ppl") and not tasks:
        lines += ["No evaluation ran with this checkpoint.", ""]
    lines += [f"shrink {m.get('versions', {}).get('shrink', '')}".rstrip(), ""]
    return "\n".join(lines)


def _how_to_load(manifest: dict[str, Any], stock: str | None) -> list[str]:
    """The card's loading snippet: transformers' class (with remote code where needed) or shrink."""
    lines = ["## How to load", "", "```python"]
    if stock:
        auto = AUTO_CLASSES[Head(manifest["head"])].__name__
        remote = ", trust_remote_code=True" if stock == "remote" else ""
        lines += [
            f"from transformers import {auto}, AutoTokenizer",
            "",
            *(
                ["# the family's class plus this folder's edits (modeling_shrink.py, torch only)"]
                if remote
                else []
            ),
            f'model = {auto}.from_pretrained("<this folder>"{remote})',
            f'tokenizer = AutoTokenizer.from_pretrained("<this folder>"{remote})',
        ]
    else:
        lines += [
            "import shrink  # packed weights of a structure transformers does not build",
            "",
            'model = shrink.load("<this folder>")',
            'tokenizer = shrink.load_tokenizer("<this folder>")',
        ]
    return [*lines, "```"]
