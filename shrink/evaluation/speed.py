"""Speed and size: forward latency and tokens/s at a fixed batch and length (median and spread
of repeats after warm-up, timed by `torch.utils.benchmark`), MACs per token, and bytes of weights.
The latency of a compressed model means little without its MAC ratio beside it, so both are
reported together."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.benchmark import Measurement, Timer

from ..cost import CostModel
from ..models import build_adapter


@torch.no_grad()
def latency(model: nn.Module, ids: torch.Tensor, repeats: int, warmup: int = 2) -> Measurement:
    """`repeats` timed forward passes over `ids` after `warmup` untimed ones, with all of torch's
    threads (the Timer's default is one) and CUDA synchronised: `.median`, `.iqr` in seconds."""
    model.eval()
    kwargs = {"use_cache": False} if build_adapter(model).causal else {}
    for _ in range(warmup):
        model(input_ids=ids, **kwargs)
    timer = Timer(
        "model(input_ids=ids, **kwargs)",
        globals={"model": model, "ids": ids, "kwargs": kwargs},
        num_threads=torch.get_num_threads(),
    )
    (merged,) = Measurement.merge([timer.timeit(1) for _ in range(repeats)])
    return merged


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
) -> dict[str, float]:
    """Latency, throughput, MACs and weight bytes of `model` on random token ids (seeded)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    timed = latency(model, ids.to(device), repeats, warmup)
    blocks, whole = macs_per_token(model, seq_len)
    return {
        "latency_ms": 1000 * timed.median,
        "latency_iqr_ms": 1000 * timed.iqr,  # interquartile range of the repeats
        "tokens_per_s": batch_size * seq_len / timed.median,
        "block_macs_per_token": blocks,
        "model_macs_per_token": whole,
        "weight_bytes": weight_bytes(model),
    }
