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
from omegaconf import DictConfig

from ..blocks.context import BlockContext, BlockResult
from ..blocks.gradients import Saliences
from ..config import MethodConf
from ..errors import ShrinkError
from ..models import Adapter
from ..planning.budget import PlanInputs
from . import register
from .scored import BlockScores, ScoredPruner, UnitScores
from .units import ffn_costs


class Taylor(str, Enum):
    param_first = "param_first"  # Σ |w·g| over the structure's weights (the reference's default)
    vectorize = "vectorize"  # Σ over channels of |Σ w·g| along the channel


@dataclass
class LLMPrunerConf(MethodConf):
    name: str = "llm-pruner"
    taylor: Taylor = Taylor.param_first
    # LLM-Pruner's own knob (`--pruning_ratio`): the share of key channels and of FFN neurons each
    # block under schedule=span loses, counted as the reference counts them; the budget follows
    ratio: float | None = None


def _rows(s: Saliences, taylor: Taylor) -> torch.Tensor:
    return s.rows_abs if taylor == Taylor.param_first else s.rows.abs()


def _cols(s: Saliences, taylor: Taylor) -> torch.Tensor:
    return s.cols_abs if taylor == Taylor.param_first else s.cols.abs()


@register("llm-pruner", LLMPrunerConf)
class LLMPruner(ScoredPruner):
    needs_gradients = True

    knob = "ratio"

    @staticmethod
    def check(cfg: DictConfig, calib_batch: int | None = None, propagate: str = "compressed") -> None:
        if cfg.ratio is not None and not 0.0 < float(cfg.ratio) < 1.0:
            raise ShrinkError(f"method.ratio={cfg.ratio} must lie in (0, 1): the share each span block loses")

    def native_budget(self, contexts: list[BlockContext], inputs: PlanInputs) -> float | None:
        """What the reference keeps at `ratio`: in each block of the span, its count of KV groups and
        neurons (`ratio_units`); the blocks outside it dense."""
        if inputs.schedule != "span":
            raise ShrinkError(
                f"method.ratio is LLM-Pruner's ratio for the blocks schedule=span prunes; under schedule "
                f"{inputs.schedule!r} set budget instead"
            )
        first, last = inputs.dense_ends
        kept = 0.0
        for ctx, sites in zip(contexts, inputs.costs.sites, strict=True):
            if not first <= ctx.index < len(contexts) - last:
                kept += sum(sites.values())
                continue
            heads, ffn = self._head_costs(ctx), ffn_costs(ctx, self.adds_bias)
            groups, neurons = self.ratio_units(ctx)
            kept += heads.of(groups, heads.group) + ffn.of(neurons)
        return kept / inputs.costs.total

    def ratio_units(self, ctx: BlockContext) -> tuple[int, int]:
        """(KV groups, neurons) a block keeps at `ratio`, as the reference counts them: of the
        n·d key channels it removes n·d − ⌊n·d·(1 − ratio)⌋, in whole groups of d (rounded down),
        and ⌊F·(1 − ratio)⌋ of the F neurons stay; at least one of each."""
        ratio = float(self.cfg.ratio)
        _, n_kv = ctx.attention.counts()
        channels = n_kv * ctx.attention.head_dim
        removed = (channels - int(channels * (1.0 - ratio))) // ctx.attention.head_dim
        neurons = ffn_costs(ctx, self.adds_bias).neurons
        kept = max(1, int(neurons * (1.0 - ratio)))
        return max(1, n_kv - removed), max(self.width_multiple, kept - kept % self.width_multiple)

    def compress_block(self, ctx: BlockContext) -> BlockResult:
        """With `ratio`, a block the plan cuts keeps the reference's counts."""
        if self.cfg.ratio is not None and any(f < 1.0 for f in ctx.targets.values()):
            groups, neurons = self.ratio_units(ctx)
            ctx.choices = {**ctx.choices, "attn": {"kv_groups": groups}, "mlp": {"neurons": neurons}}
        return super().compress_block(ctx)

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
