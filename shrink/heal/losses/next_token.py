"""`heal=lora`: next-token loss on text, the recovery fine-tuning of SliceGPT, LLM-Pruner and
SVD-LLM (there on Alpaca, here on a shrink corpus)."""

from __future__ import annotations

import torch
from torch import nn

from .. import HEALERS
from ..base import Healer, next_token_loss
from ..config import HealConf


@HEALERS.register("lora", HealConf)
class NextToken(Healer):
    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: nn.Module | None
    ) -> torch.Tensor:
        ids = batch["input_ids"]
        return next_token_loss(student(input_ids=ids, use_cache=False).logits, ids)
