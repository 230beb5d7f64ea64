"""`flap`: FLAP — fluctuation-based adaptive structured pruning (An et al., "Fluctuation-based
Adaptive Structured Pruning for Large Language Models", AAAI 2024; reference code
github.com/CASIA-IVA-Lab/FLAP, `lib/prune.py: prune_flap`, `lib/layerwrapper.py: BiasGPT`).

Each input channel j of o_proj and down_proj gets a fluctuation score from the calibration
inputs x and the weight W it feeds:
  WIFV (default)  Var[x_j] · ‖W[:, j]‖²     (the output's variance that channel carries)
  WIFN            mean_i |W_ij| · √E[x_j²]
  IFV             Var[x_j]
The attention channels' scores are squared (as the reference does), then every layer's scores
are standardised ((s − mean) / std over the layer's channels, per module) so that one threshold
compares them across layers and modules; a head's score is the mean over its channels and, under
grouped-query attention, a KV group's the mean over its heads' channels (the reference prunes
heads of multi-head models only; the KV group is the unit a GQA model allows).

Allocation: `schedule=threshold` (the default in conf/method/flap.yaml) is FLAP's AL-AM, one
threshold on the standardised scores across all layers and modules; `schedule=uniform` is its
UL-UM. Bias compensation: a removed channel's calibration mean times its weight column is added
to the output projection's bias, so the layer's output keeps its mean (the bias is counted).
The reference reads every statistic on the dense model; run with `propagate=dense` for that,
while shrink's default feeds each block the compressed model's activations (as every method).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from omegaconf import DictConfig

from ..blocks.context import BlockContext
from ..config import MethodConf
from ..errors import ShrinkError
from ..linalg.moments import SecondMoment
from ..models import Site
from ..planning.budget import PlanInputs
from . import register
from .scored import BlockScores, ScoredPruner, UnitScores, channel_moments, standardised


class FlapVariance(str, Enum):
    sample = "sample"  # the sample variance over all calibration tokens (the paper's definition)
    reference = "reference"  # the reference code's running update, sequence by sequence


class FlapMetric(str, Enum):
    wifv = "wifv"  # weighted input feature variance (FLAP's default)
    wifn = "wifn"  # weighted input feature norm (Wanda's score per channel)
    ifv = "ifv"  # input feature variance


@dataclass
class FlapConf(MethodConf):
    name: str = "flap"
    metric: FlapMetric = FlapMetric.wifv
    bias: bool = True  # add the removed channels' mean output to the output projection's bias
    variance: FlapVariance = FlapVariance.sample  # how Var[x_j] is estimated (see the docstring)
    # FLAP's own knob (`--pruning_ratio`): the share of the heads' and neurons' weights removed;
    # the budget becomes 1 − ratio
    ratio: float | None = None


class RunningFluctuation(SecondMoment):
    """The moments every method reads, plus the fluctuation as FLAP's reference code accumulates it
    (`BiasGPT.add_batch`, one calibration sequence at a time): the first sequence is left out, the
    running mean is updated in place before it is subtracted (so the "old" mean it reads is the
    new one), and each sequence's sum of squared deviations is divided by the sequence count.
    Reproduces the reference's selections; `variance: sample` is the paper's definition."""

    def __init__(self, dim: int, device: torch.device | str, where: str) -> None:
        super().__init__(dim, device=device, where=where, batch_dtype=torch.float32)
        self.running_mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.fluctuation = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sequences = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        sequences = x.detach().reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.detach()[None]
        for seq in sequences.to(self.running_mean.device, torch.float64):
            n = self.sequences
            self.running_mean = self.running_mean * (n / (n + 1)) + seq.mean(0) / (n + 1)
            if n > 0:
                deviation = ((seq - self.running_mean) ** 2).sum(0)
                self.fluctuation = self.fluctuation * ((n - 1) / n) + deviation / (n + 1)
            self.sequences += 1


def channel_metric(metric: FlapMetric, weight: torch.Tensor, stats: SecondMoment) -> torch.Tensor:
    """FLAP's score of every input channel of the linear holding `weight` (float64)."""
    mean, square = channel_moments(stats)
    n = stats.count
    if isinstance(stats, RunningFluctuation):
        variance = stats.fluctuation
    else:
        variance = (square - mean * mean).clamp_min(0) * (n / max(n - 1, 1))
    w = weight.detach().to(torch.float64)
    if metric == FlapMetric.ifv:
        return variance
    if metric == FlapMetric.wifv:
        return variance * w.pow(2).sum(0)
    return w.abs().mean(0) * square.sqrt()


@register("flap", FlapConf)
class Flap(ScoredPruner):
    knob = "ratio"

    @staticmethod
    def check(cfg: DictConfig, calib_batch: int | None = None, propagate: str = "compressed") -> None:
        if cfg.ratio is not None and not 0.0 < float(cfg.ratio) < 1.0:
            raise ShrinkError(
                f"method.ratio={cfg.ratio} must lie in (0, 1): the share of the weights removed"
            )

    def native_budget(self, contexts: list[BlockContext], inputs: PlanInputs) -> float | None:
        """The reference prunes until the kept heads' and neurons' weights are closest to 1 − ratio
        of them (AL-AM), or removes that share in every layer (UL-UM); here the run keeps at most
        1 − ratio of the block cost, its added biases included."""
        ratio = self.cfg.get("ratio")
        return None if ratio is None else 1.0 - float(ratio)

    @property
    def adds_bias(self) -> bool:  # type: ignore[override]
        return bool(self.cfg.bias)

    def new_stats(
        self, site: Site, dim: int, device: torch.device, where: str, seed: int
    ) -> SecondMoment | None:
        if self.cfg.variance == FlapVariance.reference and site.name in ("attn_out", "mlp_out"):
            return RunningFluctuation(dim, device, where)
        return super().new_stats(site, dim, device, where, seed)

    def block_scores(self, ctx: BlockContext) -> BlockScores:
        metric = FlapMetric(self.cfg.metric)
        attention = ctx.attention
        n_heads, n_kv = attention.counts()
        o = attention.linear("o")
        down = ctx.block.get_submodule(ctx.site("mlp_out").linears[0])
        attn = channel_metric(metric, o.weight, ctx.stats["attn_out"])
        mlp = channel_metric(metric, down.weight, ctx.stats["mlp_out"])
        per_group = attention.head_dim * n_heads // n_kv
        groups = UnitScores(
            standardised(attn.pow(2)).reshape(n_kv, per_group).mean(1), attn.reshape(n_kv, per_group).sum(1)
        )
        return BlockScores(groups, UnitScores(standardised(mlp), mlp))
