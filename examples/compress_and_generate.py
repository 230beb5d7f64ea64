"""Compress a model to 60% of its block weights with `id`, then generate with the result and save
it as a run folder.

    python examples/compress_and_generate.py                   # SmolLM2-135M: a few minutes
    python examples/compress_and_generate.py --model tiny-llama --quick
"""

from __future__ import annotations

import torch
from _common import QUICK, QUICK_PPL, arguments

import shrink


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "smollm2-135m")
    settings = [*QUICK, *QUICK_PPL] if args.quick else []
    result = shrink.compress(
        args.model, method="id", budget=0.6, overrides=["eval=ppl", "logger=none", *settings]
    )
    ppl, achieved = result.metrics["eval"]["ppl"]["wiki"], result.metrics["budget_achieved"]
    print(f"ppl wiki {ppl['dense']:.2f} -> {ppl['compressed']:.2f}; achieved budget {achieved:.3f}")

    ids = result.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = result.model.generate(ids, max_new_tokens=12, do_sample=False)
    print("generated:", result.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    print("run folder:", result.folder)


if __name__ == "__main__":
    main()
