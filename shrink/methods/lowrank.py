"""The shared loop of the factorising methods (`svd`, `rom`, `svdllm`).

Each linear of each site becomes a `LowRankLinear` pair of the rank its target (or the
schedule's choice) allows; a method only says how to factorise one weight given its site's
input statistics. The same factorisation gives the error profile that `greedy` and `energy`
plan with: the energies whose tail is the squared error of truncating at each rank.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from ..blocks.context import BlockContext, BlockResult
from ..config import FoldTarget
from ..errors import ShrinkError
from ..linalg.decompositions import affine_output_error, fold_error, refit_left
from ..linalg.moments import CrossMoment, SecondMoment
from ..models.edits import LowRankLinear, replace_submodule
from ..planning.budget import Curve, Option, Sizes
from ..planning.cost import CostModel, module_cost
from .base import Method


@dataclass
class Factorisation:
    """What a method knows about one weight: energies λ_1 ≥ λ_2 ≥ … whose tail Σ_{i>r} λ_i is the
    squared error of rank r (on the calibration data, or on the weight for `svd`), and the factors."""

    energies: torch.Tensor
    build: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # (left, right, bias)
    spectrum: torch.Tensor  # what `spectra.npz` stores (singular values or eigenvalues)
    # what the factorisation had to do that a reader of layers.jsonl should see (svdllm's ridge)
    notes: dict[str, float] = field(default_factory=dict)


class LowRank(Method):
    has_profile = True
    factorises = True
    adds_bias: bool = False  # the factorisation gives every pair a bias (centred `rom`)

    @staticmethod
    def check(cfg: DictConfig, calib_batch: int | None = None, propagate: str = "compressed") -> None:
        if "target" not in cfg or FoldTarget(cfg.target) != FoldTarget.dense:
            return
        if propagate == "dense":
            raise ShrinkError(
                f"method.target=dense refits {cfg.name}'s factors on the dense model's activations, which "
                "with propagate=dense are the ones the block already sees; use propagate=compressed"
            )
        if cfg.get("center"):
            raise ShrinkError(
                "method.target=dense refits a linear left factor; with rom's center=true (an affine "
                "pair) use method.target=compressed"
            )

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        """Dense targets need the dense model's activations beside the propagated ones."""
        return "target" in self.cfg and FoldTarget(self.cfg.target) == FoldTarget.dense

    def _rank(self, ctx: BlockContext, path: str, fraction: float) -> int | None:
        linear = ctx.block.get_submodule(path)
        if path in ctx.choices:
            return ctx.choices[path]["rank"]
        rank = ctx.costs.largest_rank(linear, linear.bias is not None or self.adds_bias, fraction)
        if rank is None or self.width_multiple == 1:
            return rank
        if rank < self.width_multiple:
            raise ShrinkError(
                f"block {ctx.index} {path}: the budget allows rank {rank}, below the multiple of "
                f"{self.width_multiple} that the sparsity pattern or quantization group needs; "
                "raise the budget"
            )
        return rank - rank % self.width_multiple

    @abstractmethod
    def factorise(self, linear: nn.Linear, stats: SecondMoment | None) -> Factorisation:
        """Factorisation of `linear.weight` given its input statistics."""

    def compress_block(self, ctx: BlockContext) -> BlockResult:
        records, spectra = [], {}
        for site in ctx.sites:
            stats = ctx.stats.get(site.name)
            fraction = ctx.targets[site.name]
            ranks = {path: self._rank(ctx, path, fraction) for path in site.linears}
            cross: CrossMoment | None = None
            if self.needs_teacher and any(r is not None for r in ranks.values()):
                # after this block's earlier sites were cut: the inputs this site now really gets
                cross = ctx.cross_moments([site.name])[site.name]
            for path in site.linears:
                start = time.perf_counter()
                linear = ctx.block.get_submodule(path)
                dense_cost = module_cost(linear)
                rank = ranks[path]
                fact = self.factorise(linear, stats)
                spectra[path] = fact.spectrum.cpu().numpy()
                error, energy = 0.0, 1.0
                if rank is not None:
                    left, right, new_bias = fact.build(rank)
                    w = linear.weight.detach().to(torch.float64)
                    if cross is not None:  # the bias stays: only the linear map is refitted
                        left = refit_left(w, left, right, cross, float(self.cfg.target_ridge))
                        every = torch.arange(w.shape[1], device=w.device)
                        error = fold_error(w, left @ right, every, None, cross.x, cross)
                    elif stats is not None:
                        shift = None
                        if new_bias is not None:
                            old = linear.bias.detach().to(torch.float64) if linear.bias is not None else 0.0
                            shift = old - new_bias
                        error = affine_output_error(w - left @ right, shift, w, stats.moment(), stats.mean())
                    total = float(fact.energies.sum())
                    energy = float(fact.energies[:rank].sum()) / total if total > 0 else 1.0
                    replace_submodule(
                        ctx.block, path, LowRankLinear.from_factors(left, right, new_bias, linear)
                    )
                kept_cost = module_cost(ctx.block.get_submodule(path))
                records.append(
                    {
                        "site": site.name,
                        "linear": path,
                        "in": linear.in_features,
                        "out": linear.out_features,
                        "rank": rank,
                        "params_dense": dense_cost.params,
                        "params_kept": kept_cost.params,
                        "macs_dense": dense_cost.macs,
                        "macs_kept": kept_cost.macs,
                        "target": fraction,
                        "rel_error": error,
                        "energy_kept": energy,
                        **fact.notes,
                        "seconds": time.perf_counter() - start,
                    }
                )
        return BlockResult(records, spectra)

    def _ranks(self, linear: nn.Linear) -> range:
        """The ranks a pair may take: multiples of the width multiple, still cheaper than dense."""
        return range(self.width_multiple, CostModel.max_rank(linear) + 1, self.width_multiple)

    def sizes(self, ctx: BlockContext) -> list[Sizes]:
        """Each linear: its pairs of every rank on offer, or dense."""
        units = []
        for site in ctx.sites:
            for path in site.linears:
                linear = ctx.block.get_submodule(path)
                dense = ctx.costs.planned(linear)
                bias = linear.bias is not None or self.adds_bias
                prices = tuple(ctx.costs.rank_pair(linear, r, bias) for r in self._ranks(linear))
                units.append(Sizes(ctx.index, path, (site.name,), dense, (*prices, dense)))
        return units

    def profile(self, ctx: BlockContext) -> list[Curve]:
        """One curve per linear: every rank still cheaper than dense, plus dense itself."""
        curves = []
        for site in ctx.sites:
            stats = ctx.stats.get(site.name)
            for path in site.linears:
                linear = ctx.block.get_submodule(path)
                fact = self.factorise(linear, stats)
                energies = fact.energies.clamp_min(0)
                total = float(energies.sum())
                tail = (total - torch.cumsum(energies, 0)).clamp_min(0)
                tail = torch.cat([torch.tensor([total], dtype=tail.dtype, device=tail.device), tail])
                dense = ctx.costs.planned(linear)
                bias = linear.bias is not None or self.adds_bias
                options = [
                    Option(
                        ctx.costs.rank_pair(linear, r, bias),
                        (float(tail[min(r, len(tail) - 1)]) / total) ** 0.5 if total > 0 else 0.0,
                        {"rank": r},
                    )
                    for r in self._ranks(linear)
                ]
                options.append(Option(dense, 0.0, {"rank": None}))
                curves.append(Curve(ctx.index, path, (site.name,), dense, options))
        return curves
