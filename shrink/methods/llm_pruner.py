"""`llm-pruner`: LLM-Pruner's block-wise structured pruning by first-order Taylor importance (Ma et
al., "LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023; reference code
github.com/horseee/LLM-Pruner, `llama3.py` and `LLMPruner/pruner/hf_llama_pruner.py:
TaylorImportance`), without its LoRA recovery (recovery is a stage of its own).

A coupled structure is every weight that must go together: an FFN neuron (its rows of gate/up or
fc1 and its column of down or fc2) and an attention head with its q/k/v rows and o columns; under
grouped-query attention the KV group with all of its query heads, the unit the reference prunes
too (its root is k_proj, in consecutive spans of the head size). Its importance is the first-order
change of the calibration loss when it goes, from one gradient of the whole dense model:
  param_first (default)  Σ over the structure's weights of |W ⊙ ∂L/∂W|
  vectorize              Σ over the structure's channels of |Σ over the channel's row or column of W ⊙ ∂L/∂W|
summed over the structure's linears (the reference's `grouping_strategy=sum`). The loss is the
mean next-token loss over the same calibration windows as every method (the reference: 10
BookCorpus sequences of 64 tokens), so the whole model must be resident while it runs backward.

Allocation: the reference prunes the same channel ratio in every block of a middle range (blocks
4–29 of a 32-block Llama; the first and last blocks stay dense), which `schedule=span` is, the
default for this method. The heads lose ⌊(1 − share)·n⌋ KV groups, as the reference counts them,
and the FFN takes the rest of the block's target. Its global variant (`--global_pruning`) ranks
the raw importances of all structures together: `schedule=threshold`. No bias compensation: the
reference slices the weights.

Where this differs from the reference on grouped-query models: the reference sums the q_proj rows
and o_proj columns into its KV groups by position modulo the KV width, so a KV group's importance
mixes query heads of other groups (heads h, h+n_kv, …) while pruning takes its own (heads
h·g … h·g+g−1); here a KV group's importance is the sum over the heads it removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ..blocks.context import BlockContext
from ..blocks.gradients import Saliences
from ..config import MethodConf
from ..errors import ShrinkError
from ..models import Adapter
from . import register
from .scored import BlockScores, ScoredPruner, UnitScores


class Taylor(str, Enum):
    param_first = "param_first"  # Σ |w·g| over the structure's weights (the reference's default)
    vectorize = "vectorize"  # Σ over channels of |Σ w·g| along the channel


@dataclass
class LLMPrunerConf(MethodConf):
    name: str = "llm-pruner"
    taylor: Taylor = Taylor.param_first


def _rows(s: Saliences, taylor: Taylor) -> torch.Tensor:
    return s.rows_abs if taylor == Taylor.param_first else s.rows.abs()


def _cols(s: Saliences, taylor: Taylor) -> torch.Tensor:
    return s.cols_abs if taylor == Taylor.param_first else s.cols.abs()


@register("llm-pruner", LLMPrunerConf)
class LLMPruner(ScoredPruner):
    needs_gradients = True

    def check_model(self, adapter: Adapter) -> None:
        if not adapter.causal:
            raise ShrinkError(
                f"method 'llm-pruner' scores by the gradient of the next-token loss; model family "
                f"{adapter.family!r} is an encoder without one"
            )

    def block_scores(self, ctx: BlockContext) -> BlockScores:
        if ctx.saliences is None:
            raise RuntimeError(f"block {ctx.index}: llm-pruner needs the gradient pass's saliences")
        taylor = Taylor(self.cfg.taylor)
        s = ctx.saliences
        attention = ctx.attention
        paths = attention.paths
        n_heads, n_kv = attention.counts()
        # per KV group: its k and v rows, and the q rows and o columns of its query heads
        kv = sum(_rows(s[p], taylor).reshape(n_kv, -1).sum(1) for p in (paths.k, paths.v))
        heads = _rows(s[paths.q], taylor).reshape(n_heads, -1).sum(1)
        heads = heads + _cols(s[paths.o], taylor).reshape(n_heads, -1).sum(1)
        groups = kv + heads.reshape(n_kv, -1).sum(1)
        # per neuron: its rows of the input linears and its column of the output linear
        neurons = sum(_rows(s[p], taylor) for p in ctx.site("mlp_in").linears)
        neurons = neurons + _cols(s[ctx.site("mlp_out").linears[0]], taylor)
        return BlockScores(UnitScores(groups, groups), UnitScores(neurons, neurons))
