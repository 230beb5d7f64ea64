"""`svd`: truncated SVD of every block weight, data-free.

Each linear keeps the largest rank whose pair costs at most its target fraction; a matrix where
no rank is cheaper than the dense weight stays dense. Errors are still measured on the
calibration inputs so every method's `layers.jsonl` is comparable.
"""

from __future__ import annotations

import time

from ..budget import largest_rank, module_cost
from ..capture import BlockContext, BlockResult
from ..linalg import output_error, truncated_svd
from ..surgery import LowRankLinear, replace_submodule
from . import register
from .base import Method


@register
class SVD(Method):
    name = "svd"

    def compress_block(self, ctx: BlockContext) -> BlockResult:
        records, spectra = [], {}
        for site in ctx.sites:
            moment = ctx.stats[site.name].moment() if site.name in ctx.stats else None
            fraction = ctx.targets[site.name]
            for path in site.linears:
                start = time.perf_counter()
                linear = ctx.block.get_submodule(path)
                dense_cost = module_cost(linear)
                rank = largest_rank(
                    linear.in_features, linear.out_features, linear.bias is not None, fraction, ctx.unit
                )
                left, right, singular = truncated_svd(linear.weight, rank or 0)
                spectra[path] = singular.cpu().numpy()
                error = 0.0
                if rank is not None:
                    if moment is not None:
                        error = output_error(linear.weight.double() - left @ right, linear.weight, moment)
                    replace_submodule(
                        ctx.block, path, LowRankLinear.from_factors(left, right, linear.bias, linear)
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
                        "energy_kept": float(
                            (singular[: rank or len(singular)] ** 2).sum() / (singular**2).sum()
                        ),
                        "seconds": time.perf_counter() - start,
                    }
                )
        return BlockResult(records, spectra)
