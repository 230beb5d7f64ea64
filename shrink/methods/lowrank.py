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
from torch import nn

from ..budget import Curve, Option
from ..context import BlockContext, BlockResult
from ..cost import module_cost
from ..linalg import affine_output_error
from ..stats import SecondMoment
from ..surgery import LowRankLinear, replace_submodule
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
    adds_bias: bool = False  # the factorisation gives every pair a bias (centred `rom`)

    @abstractmethod
    def factorise(self, linear: nn.Linear, stats: SecondMoment | None) -> Factorisation:
        """Factorisation of `linear.weight` given its input statistics."""

    def compress_block(self, ctx: BlockContext) -> BlockResult:
        records, spectra = [], {}
        for site in ctx.sites:
            stats = ctx.stats.get(site.name)
            fraction = ctx.targets[site.name]
            for path in site.linears:
                start = time.perf_counter()
                linear = ctx.block.get_submodule(path)
                dense_cost = module_cost(linear)
                bias = linear.bias is not None or self.adds_bias
                if path in ctx.choices:
                    rank = ctx.choices[path]["rank"]
                else:
                    rank = ctx.costs.largest_rank(linear, bias, fraction)
                fact = self.factorise(linear, stats)
                spectra[path] = fact.spectrum.cpu().numpy()
                error, energy = 0.0, 1.0
                if rank is not None:
                    left, right, new_bias = fact.build(rank)
                    w = linear.weight.detach().to(torch.float64)
                    if stats is not None:
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
                dense = module_cost(linear).of(ctx.costs.unit)
                bias = linear.bias is not None or self.adds_bias
                options = [
                    Option(
                        ctx.costs.rank_pair(linear, r, bias),
                        (float(tail[min(r, len(tail) - 1)]) / total) ** 0.5 if total > 0 else 0.0,
                        {"rank": r},
                    )
                    for r in range(1, ctx.costs.max_rank(linear) + 1)
                ]
                options.append(Option(dense, 0.0, {"rank": None}))
                curves.append(Curve(ctx.index, path, (site.name,), dense, options))
        return curves
