"""The text heal trains on: windows of a corpus's calibration part, never its test part."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedTokenizerBase

from ..data import corpora
from ..errors import ShrinkError


def heal_windows(
    corpus: str,
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    seq_len: int,
    seed: int,
    add_bos: bool = False,
) -> torch.Tensor:
    """ceil(tokens / seq_len) windows of `seq_len` tokens: the calibration part cut into
    non-overlapping windows, in a seeded order, from the start again once all are used."""
    stream = corpora.token_stream(corpus, "calib", tokenizer)
    count = stream.numel() // seq_len
    if count == 0:
        raise ShrinkError(
            f"heal.corpus={corpus} has {stream.numel()} calibration tokens, fewer than heal.seq_len={seq_len}"
        )
    cut = stream[: count * seq_len].view(count, seq_len)
    wanted = math.ceil(tokens / seq_len)
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(count, generator=generator) for _ in range(math.ceil(wanted / count))])
    return corpora.with_bos(cut[order[:wanted]], tokenizer, add_bos)
