"""Compressed models in llama.cpp: GGUF files written by `python -m shrink export --gguf`, run by
llama.cpp through its Python bindings (`GGUF=1 bash setup.sh`), dense against compressed.

For the dense model (the run's base model) and each run, at each type: the file's size, prompt
tokens/s (one pass over a `--prompt`-token prompt) and decode tokens/s (`--decode` greedy tokens
after it), best of `--rounds` taken in turn with the dense file's; and at `--check-type` (f16 by
default) the held-out wiki perplexity in llama.cpp beside shrink's on the same windows, and the
largest logit gap on the first window.

    .venv/bin/python bench/llamacpp.py /tmp/id05 --types q8_0 q4_k_m
    .venv/bin/python bench/llamacpp.py RUN [RUN …] --out bench/results/llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shrink.checkpoints import gguf_file  # noqa: E402
from shrink.checkpoints.export import _base_vocab, export_gguf  # noqa: E402
from shrink.checkpoints.save_load import load, load_tokenizer  # noqa: E402
from shrink.data.corpora import test_windows  # noqa: E402
from shrink.evaluation.perplexity import perplexity  # noqa: E402
from shrink.models import load_model  # noqa: E402
from shrink.run.plugins import load_plugins  # noqa: E402


def dense_gguf(run: Path, kind: str, folder: Path) -> Path:
    """The run's base model, uncompressed, as a GGUF of `kind`."""
    out = folder / f"dense-{kind}.gguf"
    if not out.exists():
        cfg = OmegaConf.load(run / "config.yaml")
        model = load_model(cfg.model, torch.float32, seed=int(cfg.seed)).model
        gguf_file.write(model, out, kind, _base_vocab(run, run / "model", model), name="dense")
    return out


def run_gguf(run: Path, kind: str) -> Path:
    out = gguf_file.default_name(run, kind)
    if not out.exists():
        export_gguf(run, kind)
    return out


def speed(path: Path, prompt: int, decode: int, rounds: int, threads: int) -> dict:
    """Prompt and decode tokens/s of the file in llama.cpp (best of `rounds`)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=prompt + decode + 8, n_threads=threads, n_batch=512, verbose=False)
    ids = np.random.default_rng(0).integers(100, 40000, prompt).tolist()
    vocab = llm.n_vocab()
    best_prompt, best_decode = 0.0, 0.0
    for _ in range(rounds):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        best_prompt = max(best_prompt, prompt / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(decode):  # greedy, from the last position's logits (all a decode step makes)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            llm.eval([int(np.argmax(logits))])
        best_decode = max(best_decode, decode / (time.perf_counter() - start))
    return {"prompt_tokens_per_s": best_prompt, "decode_tokens_per_s": best_decode}


def agreement(path: Path, run: Path, windows: torch.Tensor) -> dict:
    """Held-out perplexity in llama.cpp and in shrink on the same windows, and the largest logit
    gap on the first window relative to the largest logit."""
    import llama_cpp

    model = load(run / "model").eval()
    shrink_ppl = perplexity(model, windows, 1, torch.device("cpu"))["ppl"]
    llm = llama_cpp.Llama(str(path), n_ctx=windows.shape[1], logits_all=True, n_batch=512, verbose=False)
    nll, count, gap = 0.0, 0, 0.0
    for index, window in enumerate(windows):
        llm.reset()
        llm.eval(window.tolist())
        logits = torch.tensor(np.array(llm.scores[: window.numel()]), dtype=torch.float64)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))
        count += window.numel() - 1
        if index == 0:
            with torch.no_grad():
                expected = model(input_ids=window[None]).logits[0].double()
            gap = float((logits - expected).abs().max() / expected.abs().max())
    return {"llama_cpp_ppl": math.exp(nll / count), "shrink_ppl": shrink_ppl, "logits_max_rel_diff": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--types", nargs="+", default=["q8_0", "q4_k_m"])
    parser.add_argument("--check-type", default="f16")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=4, help="held-out wiki windows of 1024 tokens")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_plugins()
    rows = []
    for run in args.runs:
        for kind in args.types:
            files = {"dense": dense_gguf(run, kind, run), run.name: run_gguf(run, kind)}
            best: dict[str, dict] = {}
            for _ in range(args.rounds):  # the two files in turn, so that a slow spell slows both
                for name, path in files.items():
                    timing = speed(path, args.prompt, args.decode, 1, args.threads)
                    best[name] = {k: max(v, best.get(name, {}).get(k, 0.0)) for k, v in timing.items()}
            for name, path in files.items():
                rows.append({"model": name, "type": kind, "mb": path.stat().st_size / 2**20, **best[name]})
                print(json.dumps(rows[-1]), flush=True)
        windows = test_windows("wiki", load_tokenizer(run / "model"), 1024, args.windows * 1024)
        check = agreement(run_gguf(run, args.check_type), run, windows)
        rows.append({"model": run.name, "type": args.check_type, **check})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
