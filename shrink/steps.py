"""Sparsity and quantization stacked on any method: per block, after the method's edit.

Order within a block: the method's structural edit → sparsity → quantization. The sites are
visited in forward order, and each site's input moment is taken on the block as edited so far
(the structural edit and the earlier sites' sparsity and quantization), on the propagated
calibration stream: the Gram matrix XᵀX every method already works with is GPTQ's and SparseGPT's
Hessian. The solvers are in `linalg`; a factor pair's second factor sees the first one's output
(moment R XᵀX Rᵀ), and an output projection that reads part of each head (thinned heads) sees
those columns of its input.

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
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .config import FoldTarget, GptaqForm, QuantConf, SparsityConf
from .context import BlockContext
from .cost import weight_bytes
from .errors import ShrinkError
from .models import Site
from .packing import attach_grid
from .placement import BlockState
from .solvers import (
    Grid,
    asymmetric_target,
    gptq_refitted,
    lowrank_correction,
    nm_pattern,
    rtn,
    sparsegpt,
    wanda,
)
from .stats import CrossMoment, SecondMoment
from .surgery import CorrectedLinear, HeadSlicedLinear, LowRankLinear, replace_submodule

QUANT = ("none", "rtn", "gptq")
SPARSITY = ("none", "wanda", "sparsegpt")
BITS = (8, 4, 3, 2)
GROUP_SIZES = (-1, 32, 64, 128)


def check(cfg: DictConfig, factorises: bool = False) -> None:
    """Value checks of `quant` and `sparsity`, before anything loads; `factorises`: the method
    leaves factor pairs."""
    q, s = cfg.quant, cfg.sparsity
    if q.name not in QUANT:
        raise ShrinkError(f"unknown quant {q.name!r}; valid: {', '.join(QUANT)}")
    if s.name not in SPARSITY:
        raise ShrinkError(f"unknown sparsity {s.name!r}; valid: {', '.join(SPARSITY)}")
    if q.name != "none":
        if int(q.bits) not in BITS:
            raise ShrinkError(f"quant.bits={q.bits} is not supported; valid: {', '.join(map(str, BITS))}")
        if int(q.group_size) not in GROUP_SIZES:
            valid = ", ".join(map(str, GROUP_SIZES))
            raise ShrinkError(f"quant.group_size={q.group_size} is not supported; valid: {valid}")
        if float(q.dampening) <= 0:
            raise ShrinkError(f"quant.dampening={q.dampening} must be positive")
        if int(q.refit) < 0:
            raise ShrinkError(f"quant.refit={q.refit} is a number of rounds: 0 (none) or more")
        if int(q.refit) and q.name != "gptq":
            raise ShrinkError(
                f"quant.refit fits scales to the calibration inputs; quant={q.name} has no calibration: "
                "use quant=gptq"
            )
        if q.target == "dense" and q.name != "gptq":
            raise ShrinkError(
                f"quant.target=dense calibrates GPTQ (GPTAQ); quant={q.name} has no calibration: "
                "use quant=gptq"
            )
        if not 0 < float(q.alpha) <= 1:
            raise ShrinkError(f"quant.alpha={q.alpha} scales GPTAQ's asymmetry term: a value in (0, 1]")
        if int(q.lowrank) < 0:
            raise ShrinkError(f"quant.lowrank={q.lowrank} must be a rank: 0 (no correction) or more")
        if int(q.lowrank) > 0 and factorises:
            raise ShrinkError(
                f"quant.lowrank corrects plain linears; method={cfg.method.name} leaves rank-r factor pairs, "
                "whose own rank is the place to spend those parameters: raise the budget instead"
            )
        if cfg.budget_unit == "bytes" and int(q.group_size) <= 0:
            raise ShrinkError(
                "budget_unit=bytes prices a quantized weight at its bits plus a share of its group's "
                f"scale; with quant.group_size={q.group_size} the per-row scale does not shrink with "
                "the kept widths: use quant.group_size 32, 64 or 128"
            )
    if s.name != "none":
        pattern = str(s.pattern)
        try:
            nm = nm_pattern(pattern)
        except ValueError:
            nm = (0, 0)
        if nm is not None and not 0 < nm[0] < nm[1]:
            raise ShrinkError(
                f"sparsity.pattern={pattern!r} is not a pattern; valid: unstructured, or N:M, 0 < N < M (2:4)"
            )
        if nm is None and not 0.0 < float(s.fraction) < 1.0:
            raise ShrinkError(
                f"sparsity.fraction={s.fraction} must be in (0, 1): the share of weights zeroed"
            )
        if float(s.dampening) <= 0:
            raise ShrinkError(f"sparsity.dampening={s.dampening} must be positive")


# each step's schema, what it does, and the options that run it
STEP_GROUPS = {
    "quant": (QuantConf, "quantization", ("rtn", "gptq")),
    "sparsity": (SparsityConf, "sparsity", ("wanda", "sparsegpt")),
}


def check_unused_keys(cfg: DictConfig, overrides: list[str], multirun: bool) -> None:
    """A `quant.*` or `sparsity.*` key set while that step is `none` would change nothing, and the
    user would believe the model quantized: refuse it (keys named on the command line, or values
    other than the schema's). A sweep that crosses `quant=none,gptq` with `quant.bits=…` is the
    exception: its none job names the group on purpose."""
    named = [o.lstrip("+~").partition("=")[0] for o in overrides]
    for group, (schema, step, options) in STEP_GROUPS.items():
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


def stored_bits(quant: DictConfig, dtype_bits: int) -> float:
    """What one weight of a block linear is stored in: the dtype, or once quantized its bits plus
    its share of its group's scale (in the dtype) and, when asymmetric, packed zero point."""
    if quant.name == "none":
        return float(dtype_bits)
    bits = int(quant.bits)
    return bits + (dtype_bits + (0 if bool(quant.sym) else bits)) / int(quant.group_size)


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


def summary(cfg: DictConfig, adapter, block_states: BlockState | None = None) -> dict[str, Any]:
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
        gram = moments.gram
        dense = linear.weight.detach().to(torch.float64)
        weight, keep = dense, None
        pattern = nm_pattern(str(self.sparsity.pattern)) if self.sparsity.name != "none" else None
        fraction = float(self.sparsity.fraction)
        if self.sparsity.name == "wanda":
            weight, keep = wanda(weight, gram, fraction, pattern)
        elif self.sparsity.name == "sparsegpt":
            weight, keep = sparsegpt(
                weight, gram, fraction, pattern, float(self.sparsity.dampening), where=where
            )
        grid: Grid | None = None
        q = self.quant
        if q.name == "rtn":
            weight, grid = rtn(
                weight, int(q.bits), int(q.group_size), bool(q.sym), linear.weight.dtype, bool(q.clip)
            )
            if keep is not None:
                weight = weight * keep
        gptaq = q.name == "gptq" and moments.cross is not None  # asymmetric calibration
        target, asymmetry = dense, None  # what the stored weight stands in for, on these inputs

        def corrected(w: torch.Tensor) -> torch.Tensor:  # GPTAQ's closed-form target of w
            return asymmetric_target(w, gram, moments.cross, float(q.dampening), float(q.alpha), where)

        if gptaq and GptaqForm(q.gptaq_form) == GptaqForm.recursion:
            asymmetry = moments.cross - gram
        elif gptaq:
            target = corrected(dense)
            weight = target if keep is None else corrected(weight)  # a pruned weight keeps its mask
        if q.name == "gptq":
            refit = int(q.refit)  # the refit's target: under the recursion, the closed-form one
            fit_to = corrected(weight) if asymmetry is not None and refit else weight
            weight, grid = gptq_refitted(
                weight, gram, fit_to, refit, float(q.dampening), linear.weight.dtype, where,
                bits=int(q.bits), group_size=int(q.group_size), sym=bool(q.sym), act_order=bool(q.act_order),
                keep=keep, asymmetry=asymmetry, alpha=float(q.alpha), clip=bool(q.clip),
            )  # fmt: skip
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
            target = corrected(dense) if asymmetry is not None else target
            weight = weight + self._correct(where, linear, target - weight, gram, rank, path, block)
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


class Moments(NamedTuple):
    """A linear's input moments: H = X̃ᵀX̃ of the inputs it gets; with a dense target (GPTAQ) also
    XᵀX̃ and XᵀX of the reference inputs X."""

    gram: torch.Tensor
    cross: torch.Tensor | None = None
    reference: torch.Tensor | None = None

    def map(self, edit) -> Moments:
        return Moments(*(None if m is None else edit(m) for m in self))


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
        if isinstance(module, LowRankLinear):
            inner = [(".first", module.first), (".second", module.second)]
        else:  # a corrected linear: its quantized base (the correction stays in full precision)
            inner = [(".base", module.base)] if isinstance(module, CorrectedLinear) else [("", module)]
        return [(name, linear, None) for name, linear in inner]
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
