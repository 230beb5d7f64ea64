"""A Llama-2-7B-shaped model compressed on this machine with `stream=true`.

Writes a checkpoint of Llama-2-7B's shape (hidden 4096, FFN 11008, 32 blocks, 32 heads, vocabulary
32000) with random bfloat16 weights, one safetensors shard per block (about 13.5 GB; the weights
are drawn shard by shard, so writing it never holds more than one block), with shrink's byte
tokenizer, then runs `launch.py model=local stream=true` on it with a small calibration set and
reports the run's peak RSS (against the model's bfloat16 size), seconds per block, and the size of
the checkpoint it wrote. The folder is reused when it exists.

    .venv/bin/python bench/scale.py --out /tmp/scale                 # id at 0.5, uniform, 4×256 tokens
    .venv/bin/python bench/scale.py --out /tmp/scale --layers 4      # a quick look at 4 blocks
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shrink.models.loading import byte_tokenizer  # noqa: E402

SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}


def block_tensors(index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    shapes = {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h), "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }  # fmt: skip
    out = {}
    for name, shape in shapes.items():
        weight = torch.randn(shape, generator=gen) / shape[1] ** 0.5  # unit-variance outputs
        out[f"model.layers.{index}.{name}"] = weight.to(torch.bfloat16)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{index}.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    return out


def write_checkpoint(folder: Path, layers: int) -> float:
    """The random checkpoint (one shard per block); returns its size in GB."""
    if (folder / "model.safetensors.index.json").exists():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    h, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
    shards = [
        ("outside.safetensors", lambda: {
            "model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * 0.02).to(torch.bfloat16),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            "lm_head.weight": (torch.randn(v, h, generator=gen) / h**0.5).to(torch.bfloat16),
        }),
        *((f"block-{i:03d}.safetensors", lambda i=i: block_tensors(i, gen)) for i in range(layers)),
    ]  # fmt: skip
    total = 0
    for name, make in shards:
        tensors = make()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257,
        **SHAPE,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    byte_tokenizer().save_pretrained(folder)
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the checkpoint and the run go")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("overrides", nargs="*", default=["method=id", "budget=0.5", "schedule=uniform"])
    args = parser.parse_args()
    folder = args.out / f"llama-7b-shaped-{args.layers}"
    start = time.perf_counter()
    size_gb = write_checkpoint(folder, args.layers)
    print(f"checkpoint {folder}: {size_gb:.2f} GB bf16 ({time.perf_counter() - start:.0f} s)", flush=True)
    run_dir = args.out / f"run-{args.layers}"
    cmd = [
        sys.executable, str(ROOT / "launch.py"), "model=local", f"model.path={folder}", "model.add_bos=false",
        "stream=true", "dtype=bfloat16", f"calib.nsamples={args.nsamples}", f"calib.seq_len={args.seq_len}",
        "calib.batch_size=1", "eval=none", "logger=none", "overwrite=true", f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    written = sum(p.stat().st_size for p in (run_dir / "model").glob("*.safetensors")) / 1e9
    peak_gb = metrics["peak_rss_mb"] / 1024
    rows = {
        "layers": args.layers,
        "checkpoint_gb": round(size_gb, 2),
        "peak_rss_gb": round(peak_gb, 2),
        "peak_share_of_bf16": round(peak_gb * 2**30 / 1e9 / size_gb, 3),
        "compress_seconds": round(metrics["compress_seconds"], 1),
        "seconds_per_block": round(metrics["compress_seconds"] / args.layers, 1),
        "written_gb": round(written, 2),
        "budget": metrics.get("budget"),
    }
    print(json.dumps(rows, indent=2))
    (args.out / f"scale-{args.layers}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
