"""Sparsity and quantization stacked on any method: per block, after the method's edit.

Order within a block: the method's structural edit → sparsity → quantization. The sites are
visited in forward order, and each site's input moment is taken on the block as edited so far
(the structural edit and the earlier sites' sparsity and quantization), on the propagated
calibration stream: the Gram matrix XᵀX every method already works with is GPTQ's and SparseGPT's
Hessian. The quantizers and sparsifiers are plug-ins of `quantization` and `sparsity`; a factor
pair's second factor sees the first one's output (moment R XᵀX Rᵀ), and an output projection that
reads part of each head (thinned heads) sees those columns of its input.

Quantized weights are kept as their dequantized values in the model's dtype, with the grid as
buffers of the linear (`packing.attach_grid`), so every evaluation runs as usual; the checkpoint
stores them packed in compressed-tensors' layout. That layout needs every group whole: a
quantized linear's input width must be a multiple of `quant.group_size` (checked on the dense
widths before loading; the methods keep their widths in such multiples).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import FoldTarget, named_keys
from ..errors import ShrinkError
from ..linalg.moments import CrossMoment, Moments, SecondMoment
from ..models import Site
from ..models.base import BlockState
from ..models.edits import CorrectedLinear, HeadSlicedLinear, LowRankLinear, plain_linears, replace_submodule
from ..planning.cost import weight_bytes
from ..quantization import QUANTIZERS, LinearJob, QuantConf
from ..quantization import checks as quant_checks
from ..quantization.config import GROUP_SIZES
from ..quantization.lowrank import lowrank_correction
from ..quantization.packing import attach_grid
from ..sparsity import SPARSIFIERS, SparsityConf
from ..sparsity import checks as sparsity_checks
from ..sparsity.patterns import nm_pattern
from .context import BlockContext


def check(cfg: DictConfig, factorises: bool = False) -> None:
    """Value checks of `quant` and `sparsity`, before anything loads; `factorises`: the method
    leaves factor pairs."""
    quant_checks.check(cfg, factorises)
    sparsity_checks.check(cfg.sparsity)


# each step's schema, what it does, and the options that run it
STEP_GROUPS = {
    "quant": (QuantConf, "quantization", QUANTIZERS),
    "sparsity": (SparsityConf, "sparsity", SPARSIFIERS),
}


def check_unused_keys(cfg: DictConfig, overrides: list[str], multirun: bool) -> None:
    """A `quant.*` or `sparsity.*` key set while that step is `none` would change nothing, and the
    user would believe the model quantized: refuse it (keys named on the command line, or values
    other than the schema's). A sweep that crosses `quant=none,gptq` with `quant.bits=…` is the
    exception: its none job names the group on purpose."""
    named = named_keys(overrides)
    for group, (schema, step, registry) in STEP_GROUPS.items():
        options = [name for name, _ in registry.items()]
        node = cfg[group]
        if node.name != "none" or (multirun and group in named):
            continue
        defaults = schema(name="none")
        changed = {
            f"{group}.{f.name}"
            for f in dataclasses.fields(schema)
            if f.name != "name" and node[f.name] != getattr(defaults, f.name)
        }
        keys = sorted(changed | {k for k in named if k.startswith(group + ".")})
        if keys:
            shown = " ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in keys)
            raise ShrinkError(
                f"{shown}: {group}=none runs no {step}, so {'it does' if len(keys) == 1 else 'they do'} "
                f"nothing; choose the step too ({' or '.join(f'{group}={o}' for o in options)}) or drop "
                f"{'it' if len(keys) == 1 else 'them'}"
            )


def width_multiple(cfg: DictConfig) -> int:
    """What the input widths a method leaves must be multiples of: M under an N:M pattern, and the
    quantization group (a packed group is whole)."""
    pattern = nm_pattern(str(cfg.sparsity.pattern)) if cfg.sparsity.name != "none" else None
    group = int(cfg.quant.group_size) if cfg.quant.name != "none" else -1
    return math.lcm(1 if pattern is None else pattern[1], max(group, 1))


def check_widths(cfg: DictConfig, blocks: list[nn.Module], sites: list[list[Site]]) -> None:
    """An N:M pattern needs every input width to hold whole spans of M, and a quantization group
    size whole groups (the dense model's widths, checked before anything loads; widths a method
    leaves are checked as each block is edited)."""
    if cfg.sparsity.name == "none" and cfg.quant.name == "none":
        return
    inputs = [
        (f"block {index} {path}{name}", linear.in_features)
        for index, (block, block_sites) in enumerate(zip(blocks, sites, strict=True))
        for site in block_sites
        for path in site.linears
        for name, linear, _ in _parts(block.get_submodule(path), None)
    ]
    widths = {width for _, width in inputs}
    for where, width in inputs:
        _check_span(cfg.sparsity, cfg.quant, width, where, widths)


def _check_span(
    sparsity: DictConfig, quant: DictConfig, width: int, where: str, widths: set[int] | None = None
) -> None:
    """`width` against the N:M span and the group size; `widths` (all of the model's) name the
    group sizes that would fit."""
    pattern = nm_pattern(str(sparsity.pattern)) if sparsity.name != "none" else None
    if pattern is not None and width % pattern[1]:
        raise ShrinkError(
            f"sparsity.pattern={sparsity.pattern} needs input widths divisible by {pattern[1]}, but {where} "
            f"has {width} inputs"
        )
    group = int(quant.group_size) if quant.name != "none" else -1
    if group > 0 and width % group:
        fits = [str(g) for g in GROUP_SIZES if g < 0 or all(w % g == 0 for w in widths or {width})]
        raise ShrinkError(
            f"quant.group_size={group} needs input widths divisible by {group} (packed groups are whole), "
            f"but {where} has {width} inputs; valid here: {', '.join(fits)}"
        )


def steps_summary(cfg: DictConfig, adapter, block_states: BlockState | None = None) -> dict[str, Any]:
    """What the steps left in the block linears: the share of zero weights, and the bits per
    weight the packed checkpoint stores (the weights, plus per row and group a scale in the model's
    dtype and, when asymmetric, a `bits`-bit zero point); empty when no step ran. `block_states`
    gives the tensors of blocks that are not in memory (`stream=true`)."""
    q = cfg.quant
    if q.name == "none" and cfg.sparsity.name == "none":
        return {}
    zeros = total = 0
    bits = 0.0
    for index, block in enumerate(adapter.blocks()):
        stored = block_states(index) if block_states is not None else None
        for site in adapter.sites(block):
            for path in site.linears:
                module = block.get_submodule(path)
                parts = [(name, linear) for name, linear, _ in _parts(module, None)]
                if isinstance(module, CorrectedLinear):  # full-precision factors beside the packed base
                    parts += [
                        (".correction.first", module.correction.first),
                        (".correction.second", module.correction.second),
                    ]
                for name, linear in parts:
                    weight = linear.weight.detach() if stored is None else stored[f"{path}{name}.weight"]
                    zeros += int((weight == 0).sum())
                    total += weight.numel()
                    bits += weight_bytes(linear) * 8
    return {
        "quant": dict(q.items()),
        "sparsity": dict(cfg.sparsity.items()),
        "block_zero_fraction": zeros / max(total, 1),
        "block_bits_per_weight": bits / max(total, 1),
    }


class BlockSteps:
    """The sparsity and quantization steps of a run, applied to one block at a time."""

    def __init__(self, quant: DictConfig, sparsity: DictConfig, fp32_batches: bool = True) -> None:
        self.quant, self.sparsity = quant, sparsity
        self.dtype = torch.float32 if fp32_batches else torch.float64

    @property
    def active(self) -> bool:
        return self.quant.name != "none" or self.sparsity.name != "none"

    @property
    def needs_teacher(self) -> bool:
        """GPTAQ's dense target needs the dense model's inputs of each block."""
        return self.quant.name != "none" and FoldTarget(self.quant.target) == FoldTarget.dense

    def apply(self, ctx: BlockContext) -> list[dict[str, Any]]:
        """Sparsify and quantize every linear of the block, site by site; one row per linear."""
        if self.needs_teacher and ctx.teacher_hidden is None:
            raise RuntimeError("quant.target=dense needs the dense stream (the runner's teacher)")
        # the block before these steps, run on the dense model's inputs: the reference of GPTAQ
        reference = copy.deepcopy(ctx.block) if self.needs_teacher else None
        rows = []
        for site in ctx.sites:
            moments = self._site_moments(ctx, site, reference)
            for path in site.linears:
                for name, linear, part in _parts(ctx.block.get_submodule(path), moments):
                    where = f"block {ctx.index} {path}{name}"
                    rows.append(self._edit(where, linear, part, path + name, ctx.block))
        return rows

    def _site_moments(self, ctx: BlockContext, site: Site, reference: nn.Module | None) -> Moments:
        """The site's input moment (the full input: a thinned o_proj reads part of it) and, with a
        reference block, the cross moment of the reference inputs with these and their own."""
        first, moment = site.linears[0], None
        where = f"block {ctx.index} {site.name}"
        for b, h in enumerate(ctx.hidden):
            x = ctx.linear_input(first, h, b)
            if reference is not None:
                assert ctx.teacher_hidden is not None
                y = ctx.linear_input(first, ctx.teacher_hidden[b], b, block=reference)
                if moment is None:
                    moment = CrossMoment(x.shape[-1], x.device, where, batch_dtype=self.dtype)
                moment.update(x, y)
                continue
            if moment is None:
                moment = SecondMoment(x.shape[-1], device=x.device, where=where, batch_dtype=self.dtype)
            moment.update(x)
        assert moment is not None, "the runner gives every block at least one calibration batch"
        if isinstance(moment, CrossMoment):
            return Moments(moment.x.xtx, moment.xty.T, moment.yty)
        return Moments(moment.xtx)

    def _edit(
        self, where: str, linear: nn.Linear, moments: Moments, path: str, block: nn.Module
    ) -> dict[str, Any]:
        start = time.perf_counter()
        _check_span(self.sparsity, self.quant, linear.in_features, where)
        dense = linear.weight.detach().to(torch.float64)
        weight, keep = dense, None
        if self.sparsity.name != "none":
            sparsifier = SPARSIFIERS[self.sparsity.name]()
            weight, keep = sparsifier.sparsify(weight, moments.gram, self.sparsity, where)
        q, grid, target = self.quant, None, lambda: dense  # what the stored weight stands in for
        if q.name != "none":
            job = LinearJob(where, dense, weight, keep, moments, linear.weight.dtype)
            weight, grid, target = QUANTIZERS[q.name]().quantize(job, q)
        if not torch.isfinite(weight).all():
            raise ShrinkError(f"{where}: the sparsity/quantization step produced non-finite weights")
        with torch.no_grad():
            linear.weight.copy_(weight.to(linear.weight.dtype))
        if grid is not None:
            attach_grid(linear, grid, bool(q.sym))
        row: dict[str, Any] = {
            "site": path,
            "step": "+".join(n for n in (self.sparsity.name, q.name) if n != "none"),
        }
        rank = int(q.lowrank) if q.name != "none" else 0
        if rank:
            row["rel_error_uncorrected"] = _relative_error(dense, weight, moments)
            weight = weight + self._correct(where, linear, target() - weight, moments.gram, rank, path, block)
        return row | {
            "rel_error": _relative_error(dense, weight, moments),
            "zeros": float((linear.weight == 0).double().mean()),
            "bits": int(q.bits) if q.name != "none" else None,
            "lowrank": rank or None,
            "seconds": time.perf_counter() - start,
        }

    @staticmethod
    def _correct(
        where: str,
        linear: nn.Linear,
        error: torch.Tensor,
        gram: torch.Tensor,
        rank: int,
        path: str,
        block: nn.Module,
    ) -> torch.Tensor:
        """Replace the quantized linear at `path` by it plus a rank-r correction of `error` (SLiM);
        returns the correction's weight."""
        if rank >= min(linear.in_features, linear.out_features):
            raise ShrinkError(
                f"quant.lowrank={rank} is not below {where}'s smaller side "
                f"({linear.out_features}×{linear.in_features}); lower the rank"
            )
        left, right = lowrank_correction(error, gram, rank)
        factory = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        corrected = CorrectedLinear(linear, rank, **factory)
        with torch.no_grad():
            corrected.correction.first.weight.copy_(right)
            corrected.correction.second.weight.copy_(left)
        replace_submodule(block, path, corrected)
        return corrected.correction.dense_weight().detach().to(torch.float64)


def _relative_error(dense: torch.Tensor, weight: torch.Tensor, moments: Moments) -> float:
    """‖X̃Ŵᵀ − XWᵀ‖ / ‖XWᵀ‖ from the moments (X = X̃ without a reference)."""
    if moments.cross is None:
        delta = weight - dense
        energy = float(torch.einsum("ij,jk,ik->", dense, moments.gram, dense))
        return (
            (float(torch.einsum("ij,jk,ik->", delta, moments.gram, delta)) / energy) ** 0.5
            if energy > 0
            else 0.0
        )
    energy = float(torch.einsum("ij,jk,ik->", dense, moments.reference, dense))
    squared = (
        float(torch.einsum("ij,jk,ik->", weight, moments.gram, weight))
        - 2 * float(torch.einsum("ij,jk,ik->", dense, moments.cross, weight))
        + energy
    )
    return (max(squared, 0.0) / energy) ** 0.5 if energy > 0 else 0.0


def _parts(module: nn.Module, moments: Moments | None) -> list[tuple[str, nn.Linear, Moments | None]]:
    """The plain linears of a block linear, each with the moments of its own input (None without
    them: only the linears are wanted)."""
    if moments is None:
        return [(name, linear, None) for name, linear in plain_linears(module)]
    moments = moments.map(lambda m: m.to(torch.float64))
    if isinstance(module, LowRankLinear):
        right = module.first.weight.detach().to(torch.float64)
        return [
            (".first", module.first, moments),
            (".second", module.second, moments.map(lambda m: right @ m @ right.T)),
        ]
    if isinstance(module, HeadSlicedLinear):
        places = module.input_places().to(moments.gram.device)
        return [("", module, moments.map(lambda m: m[places][:, places]))]
    if isinstance(module, nn.Linear):
        return [("", module, moments)]
    raise TypeError(f"no sparsity/quantization step for {type(module).__name__}")
