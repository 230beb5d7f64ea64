"""What the examples share: a `--model` to run on and `--quick` settings that make a run take
seconds (a few short calibration windows, a short perplexity), for trying them on a tiny model."""

from __future__ import annotations

import argparse

QUICK = ["calib.nsamples=4", "calib.seq_len=64", "calib.batch_size=2", "device=cpu"]
QUICK_PPL = ["eval.ppl.seq_len=128", "eval.ppl.max_tokens=1024"]


def arguments(description: str, model: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model", default=model, help=f"a model config, folder or .gguf file (default {model})"
    )
    parser.add_argument("--quick", action="store_true", help="a few short windows: seconds on a tiny model")
    return parser.parse_args()
