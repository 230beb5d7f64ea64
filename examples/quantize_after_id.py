"""Prune with `id` to 80% of the block weights, then quantize to 4 bits with GPTQ: both steps run
per block on the same calibration stream, and the checkpoint stores packed 4-bit weights.

    python examples/quantize_after_id.py                        # SmolLM2-135M: a few minutes
    python examples/quantize_after_id.py --model tiny-llama --quick
"""

from __future__ import annotations

from _common import QUICK, QUICK_PPL, arguments

import shrink


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "smollm2-135m")
    settings = [*QUICK, *QUICK_PPL, "quant.group_size=32"] if args.quick else []
    result = shrink.compress(
        args.model, method="id", budget=0.8,
        overrides=["quant=gptq", "quant.bits=4", "eval=ppl", "logger=none", *settings],
    )  # fmt: skip
    m = result.metrics
    ppl = m["eval"]["ppl"]["wiki"]
    print(f"ppl wiki {ppl['dense']:.2f} -> {ppl['compressed']:.2f}")
    print(f"bits per block weight {m['block_bits_per_weight']:.2f}; checkpoint {m['checkpoint_mb']:.1f} MB")


if __name__ == "__main__":
    main()
