"""Speed and size: forward latency and tokens/s at a fixed batch and length (median and spread
of repeats after warm-up, timed by `torch.utils.benchmark`), the per-token latency of greedy
decoding with the KV cache (causal LMs), MACs per token, and bytes of weights and of the KV
cache. The latency of a compressed model means little without its MAC and byte ratios beside it,
so all are reported together: a long forward is bound by multiply-adds, one decoded token by the
bytes it reads."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.benchmark import Measurement, Timer
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..models import build_adapter
from ..planning.cost import CostModel


@torch.no_grad()
def latency(
    model: nn.Module, ids: torch.Tensor, repeats: int, warmup: int = 2, bar: tqdm | None = None
) -> Measurement:
    """`repeats` timed forward passes over `ids` after `warmup` untimed ones, with all of torch's
    threads (the Timer's default is one) and CUDA synchronised: `.median`, `.iqr` in seconds.
    `bar` advances once per pass, between the timed ones."""
    model.eval()
    kwargs = {"use_cache": False} if build_adapter(model).causal else {}
    for _ in range(warmup):
        model(input_ids=ids, **kwargs)
        _tick(bar)
    timer = Timer(
        "model(input_ids=ids, **kwargs)",
        globals={"model": model, "ids": ids, "kwargs": kwargs},
        num_threads=torch.get_num_threads(),
    )
    timed = []
    for _ in range(repeats):
        timed.append(timer.timeit(1))
        _tick(bar)
    (merged,) = Measurement.merge(timed)
    return merged


def _tick(bar: tqdm | None) -> None:
    if bar is not None:
        bar.update(1)


class _TokenClock(StoppingCriteria):
    """Never stops generation; notes the time each new token is ready (CUDA synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def decode_seconds_per_token(
    model: nn.Module, prompt: torch.Tensor, tokens: int, repeats: int, warmup: int, bar: tqdm | None = None
) -> tuple[float, float]:
    """(median, interquartile range) of the seconds between consecutive tokens of greedy decoding
    with the KV cache (transformers' `generate`, `tokens` new tokens, batch 1), over `repeats`
    generations after `warmup`; the first token, which carries the prefill, is left out."""
    model.eval()
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True)
    config.pad_token_id = config.eos_token_id = None
    gaps: list[float] = []
    for step in range(warmup + repeats):
        clock = _TokenClock()
        model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
            stopping_criteria=StoppingCriteriaList([clock]),
        )  # fmt: skip
        if step >= warmup:
            gaps += [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
        _tick(bar)
    low, median, high = np.quantile(gaps, [0.25, 0.5, 0.75])
    return float(median), float(high - low)


@torch.no_grad()
def kv_cache_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the KV cache after a prefill of `ids` (one row): what every decoded token then
    reads besides the weights, and what a thin attention keeps at its kept widths."""
    model.eval()
    cache = model(input_ids=ids[:1], use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    else:  # a legacy tuple of (keys, values) per layer
        tensors = [t for pair in cache for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors)


def macs_per_token(model: nn.Module, seq_len: int) -> tuple[int, int]:
    """(block MACs, whole-model MACs incl. the LM head) per token at context `seq_len`."""
    blocks = CostModel(build_adapter(model), "macs", seq_len).model().macs
    head = model.get_output_embeddings()
    return blocks, blocks + (head.weight.numel() if head is not None else 0)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameter and buffer storages (tied weights counted once):
    what its safetensors file holds, give or take the header."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def measure(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    seed: int,
    decode_tokens: int = 0,
    prompt_len: int = 32,
    count_macs: bool = True,
    desc: str = "speed",
) -> dict[str, float]:
    """Latency, throughput, MACs (unless not `count_macs`: the same model on other kernels) and
    weight bytes of `model` on random token ids (seeded); for causal LMs the bytes of the KV cache
    at `seq_len` tokens, and with `decode_tokens` (≥ 2) the per-token decode latency after a
    `prompt_len` prompt. A progress bar (`desc`) counts the passes."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = random_ids(vocab, batch_size, seq_len, seed).to(device)
    decodes = decode_tokens > 1 and build_adapter(model).causal
    passes = (warmup + repeats) * (2 if decodes else 1)
    with tqdm(total=passes, desc=desc, unit="pass", leave=False) as bar:
        timed = latency(model, ids, repeats, warmup, bar)
        out = {
            "latency_ms": 1000 * timed.median,
            "latency_iqr_ms": 1000 * timed.iqr,  # interquartile range of the repeats
            "tokens_per_s": batch_size * seq_len / timed.median,
            "weight_bytes": weight_bytes(model),
        }
        if count_macs:
            out["block_macs_per_token"], out["model_macs_per_token"] = macs_per_token(model, seq_len)
        if build_adapter(model).causal:
            out["kv_cache_bytes"] = kv_cache_bytes(model, ids)  # at `seq_len` tokens of context
        if decodes:
            prompt = random_ids(vocab, 1, prompt_len, seed).to(device)
            median, iqr = decode_seconds_per_token(model, prompt, decode_tokens, repeats, warmup, bar)
            out["decode_ms_per_token"], out["decode_iqr_ms"] = 1000 * median, 1000 * iqr
    return out


def random_ids(vocab: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
