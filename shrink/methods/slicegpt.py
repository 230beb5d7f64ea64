"""`slicegpt`: SliceGPT — rotate the residual stream into its principal directions and slice away
the weakest (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and
Columns", ICLR 2024; reference code microsoft/TransformerCompression, `rotate.py` and
`layernorm_fusion.py`).

RMSNorm(x·Q) = RMSNorm(x)·Q for an orthogonal Q, once the norm's weight lives in the linears that
read it. So each block's norms are folded into those linears (a LayerNorm becomes a weightless
RMSNorm over a centred stream: its bias joins the readers' biases, and the linears that write the
stream are made to write zero-mean outputs). Block by block, on the calibration stream that the
already sliced blocks produce, the method takes the PCA (eigenvectors of Σxxᵀ, float64) of the
stream between attention and MLP and of the block's output, keeps the top `width` directions of
each, and rewrites the block in those bases: q/k/v and gate/up read the sliced stream, o and down
write it, and the skip connections carry it through shortcut matrices Q_inᵀQ_mid and Q_midᵀQ_out
(`modeling_shrink.add_shortcuts`). Every linear that reads or writes the stream loses the same
share of that dimension; the shortcut matrices cost 2·width² per block and are counted.

Adaptations, all documented on the method's page:
- The embedding and the LM head stay as they are. The first block reads the full-width stream
  (its q/k/v keep their inputs, its attention shortcut maps the full width to the sliced one) and
  the last block writes it back at full width in the model's own basis (the reference rotates the
  head by the last block's full-rank Q instead, which computes the same). The reference rotates and
  slices the embedding too, which on a model with tied embeddings unties the LM head (a second
  vocabulary × hidden matrix, 21% of SmolLM2-135M).
- One width for the whole stream (the reference's `ConstSlicingScheduler`), the largest multiple of
  `round_interval` whose cost meets the budget; `method.slicing` (the reference's `--sparsity`)
  sets it directly instead. PCA orientation only (`--final-orientation random` rotates within the
  kept directions, which changes nothing but rounding).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from enum import Enum

import torch
from omegaconf import DictConfig
from torch import nn

from ..blocks.context import BlockContext, BlockResult
from ..config import MethodConf
from ..errors import NumericalError, ShrinkError
from ..linalg.moments import SecondMoment
from ..modeling_shrink import SHORTCUTS, add_shortcuts
from ..models import Adapter, Site
from ..models.edits import center_outputs, fold_norm, rotate_inputs, rotate_outputs
from ..planning.budget import PlanInputs
from ..planning.cost import module_cost
from ..planning.fixed import SLACK
from . import register
from .base import Method
from .units import unit_record


class Embeddings(str, Enum):
    keep = "keep"  # the embedding keeps its width; the first block reads it whole
    # the embedding is rotated and sliced too, as the reference does (a tied LM head is untied)
    slice = "slice"


@dataclass
class SliceGPTConf(MethodConf):
    name: str = "slicegpt"
    # SliceGPT's own knob (`--sparsity`): the share of the residual stream's width sliced away;
    # the budget becomes what that keeps, shortcut matrices included
    slicing: float | None = None
    # the stream's width is a multiple of this (the reference's `--round-interval`)
    round_interval: int = 8
    embeddings: Embeddings = Embeddings.keep


@register("slicegpt", SliceGPTConf)
class SliceGPT(Method):
    knob = "slicing"
    rotates_stream = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.width: int | None = None  # the sliced stream's width; None: nothing is sliced
        self.basis: torch.Tensor | None = None  # the stream entering the next block: d × width
        # embeddings=slice: the map from the embedding's rows to the sliced stream (d × width)
        self.entry: torch.Tensor | None = None
        self.taps: dict[str, str] = {}
        self.hidden = 0
        self.n_blocks = 0

    @staticmethod
    def check(cfg: DictConfig, calib_batch: int | None = None, propagate: str = "compressed") -> None:
        if cfg.slicing is not None and not 0.0 <= float(cfg.slicing) < 1.0:
            raise ShrinkError(
                f"method.slicing={cfg.slicing} must lie in [0, 1): the share of the width sliced"
            )
        if int(cfg.round_interval) < 1:
            raise ShrinkError(f"method.round_interval={cfg.round_interval} must be a positive integer")
        if propagate != "compressed":
            raise ShrinkError(
                f"method 'slicegpt' rotates each block into the basis the blocks before it left, so it "
                f"needs propagate=compressed, not propagate={propagate}"
            )

    def check_model(self, adapter: Adapter) -> None:
        taps = adapter.stream_taps()
        if taps is None:
            raise ShrinkError(
                f"method 'slicegpt' rotates the residual stream of pre-norm blocks with one norm before "
                f"attention and one before the MLP; model {adapter.config.model_type!r} ({adapter.family} "
                "family) has not that form"
            )
        self.taps, self.hidden, self.n_blocks = taps, adapter.hidden_size(), len(adapter.blocks())

    def new_stats(self, site: Site, dim: int, device: torch.device, where: str, seed: int) -> None:
        return None  # it reads the residual stream, not the sites' inputs

    # ---- the width ---------------------------------------------------------------------------------
    def _widths(self, index: int, width: int) -> tuple[int, int, int]:
        """The stream's width entering block `index`, between its attention and MLP, leaving it."""
        d = self.hidden
        sliced_entry = Embeddings(self.cfg.embeddings) == Embeddings.slice
        return (
            d if index == 0 and not sliced_entry else width,
            width,
            d if index == self.n_blocks - 1 else width,
        )

    def _priced(self, ctx: BlockContext, width: int) -> float:
        """Block `ctx` sliced to `width` (its dense shapes otherwise), in the budget unit."""
        d_in, d_mid, d_out = self._widths(ctx.index, width)
        costs, block = ctx.costs, ctx.block
        total = costs.scores(ctx.attention).of(costs.unit)
        resized = {"attn_in": (d_in, None), "attn_out": (None, d_mid), "mlp_in": (d_mid, None)}
        resized["mlp_out"] = (None, d_out)
        # a LayerNorm's bias becomes a bias of the linears that read it
        norms = {"attn_in": self.taps["attn_norm"], "mlp_in": self.taps["mlp_norm"]}
        for site in ctx.sites:
            norm = block.get_submodule(norms[site.name]) if site.name in norms else None
            shifted = getattr(norm, "bias", None) is not None
            for path in site.linears:
                linear = block.get_submodule(path)
                new_in, new_out = resized[site.name]
                bias = linear.bias is not None or shifted
                total += costs.shaped(new_in or linear.in_features, new_out or linear.out_features, bias)
        return total + costs.shaped(d_in, d_mid, False, False) + costs.shaped(d_mid, d_out, False, False)

    def _kept(self, contexts: list[BlockContext], inputs: PlanInputs, width: int) -> float:
        return sum(self._priced(ctx, width) for ctx in contexts) / inputs.costs.total

    def native_budget(self, contexts: list[BlockContext], inputs: PlanInputs) -> float | None:
        slicing = self.cfg.get("slicing")
        if slicing is None:
            return None
        width = self._rounded(int((1.0 - float(slicing)) * self.hidden))
        kept = self._kept(contexts, inputs, width)
        if kept > 1.0:
            raise ShrinkError(
                f"method.slicing={slicing} keeps a stream {width} of {self.hidden} wide, which with the "
                f"shortcut matrices costs {kept:.4f} of the dense blocks: more than it saves; slice more"
            )
        return kept

    @property
    def _step(self) -> int:
        """Widths come in multiples of `round_interval` and of what the run's steps need."""
        return math.lcm(int(self.cfg.round_interval), self.width_multiple)

    def _rounded(self, width: int) -> int:
        return width - width % self._step

    def prepare(self, contexts: list[BlockContext], inputs: PlanInputs) -> None:
        """The widest stream (a multiple of `round_interval`) whose blocks meet the budget."""
        if inputs.budget >= 1.0 - SLACK:
            self.width = None
            return
        step = self._step
        for width in range(self._rounded(self.hidden), 0, -step):
            if self._kept(contexts, inputs, width) <= inputs.budget * (1 + SLACK):
                self.width = width
                return
        least = self._kept(contexts, inputs, step)
        raise ShrinkError(
            f"budget {inputs.budget:.4f} cannot be met by method 'slicegpt': a stream {step} wide keeps "
            f"{least:.4f} of the block cost (the first block reads and the last writes the full width); "
            "raise the budget"
        )

    def carried(self) -> dict[str, torch.Tensor]:
        found = {"basis": self.basis, "entry": self.entry}
        return {name: t for name, t in found.items() if t is not None}

    def carry(self, state: dict[str, torch.Tensor]) -> None:
        self.basis, self.entry = state.get("basis"), state.get("entry")

    def embedding_basis(self) -> torch.Tensor | None:
        return self.entry

    def _slice_entry(self, ctx: BlockContext, layer_norm: bool) -> None:
        """embeddings=slice: the PCA of the stream entering the first block (the embeddings' sum;
        centred under a LayerNorm, whose mean nothing downstream reads) gives its basis; the first
        block's inputs move into it, and the run rotates the embeddings the same way at the end."""
        d = self.hidden
        center = torch.eye(d, dtype=torch.float64) - (1.0 / d if layer_norm else 0.0)
        acc = SecondMoment(d, ctx.hidden[0].device, f"block {ctx.index} input stream")
        for h in ctx.hidden:
            acc.update(h.to(torch.float64) @ center.to(h.device))
        _, vectors = self._pca(ctx, acc)
        self.basis = vectors[:, : self.width]
        self.entry = center.to(self.basis.device) @ self.basis
        ctx.hidden[:] = [(h.to(torch.float64) @ self.entry.to(h.device)).to(h.dtype) for h in ctx.hidden]

    # ---- one block ---------------------------------------------------------------------------------
    def compress_block(self, ctx: BlockContext) -> BlockResult:
        if self.width is None:  # the budget keeps everything
            return BlockResult([], {})
        start = time.perf_counter()
        block, taps, d = ctx.block, self.taps, self.hidden
        attention = ctx.attention
        ins, outs = ctx.site("attn_in").linears, attention.paths.o
        mlp_in, mlp_out = ctx.site("mlp_in").linears, ctx.site("mlp_out").linears[0]
        paths = {"attn": [*ins, outs], "mlp": [*mlp_in, mlp_out]}
        before = {unit: [module_cost(block.get_submodule(p)) for p in ps] for unit, ps in paths.items()}
        layer_norm = isinstance(block.get_submodule(taps["attn_norm"]), nn.LayerNorm)
        if ctx.index == 0 and Embeddings(self.cfg.embeddings) == Embeddings.slice:
            self._slice_entry(ctx, layer_norm)
        first = self.basis is None  # the full-width stream of the embeddings, as they are
        if ctx.index > 0 and first:
            raise RuntimeError(f"block {ctx.index}: the basis the block before it left is missing")
        # the stream entering the first block is the raw embedding: not centred under a LayerNorm
        fold_norm(block, taps["attn_norm"], ins, d, center=layer_norm and first)
        fold_norm(block, taps["mlp_norm"], mlp_in, d, center=False)
        if layer_norm:
            center_outputs(block, outs)
            center_outputs(block, mlp_out)
        device = block.get_submodule(outs).weight.device
        if first:  # the full-width stream, in the model's own basis
            to_full = torch.eye(d, dtype=torch.float64, device=device)
            if layer_norm:  # its mean is what every LayerNorm downstream drops
                to_full -= 1.0 / d
        else:
            to_full = self.basis.T.to(device)
            for path in ins:
                rotate_inputs(block, path, self.basis)
        d_in = to_full.shape[0]
        factory = {"dtype": block.get_submodule(outs).weight.dtype, "device": device}

        # between attention and MLP: the stream as the sliced input leaves it, at full width
        add_shortcuts(block, taps, d_in, d, d, **factory)
        self._set(block, to_full, torch.eye(d, dtype=torch.float64, device=device))
        mid_values, mid = self._pca(ctx, self._mid_moment(ctx))
        mid = mid[:, : self.width]
        for path in mlp_in:
            rotate_inputs(block, path, mid)
        rotate_outputs(block, outs, mid)
        add_shortcuts(block, taps, d_in, self.width, d, **factory)
        self._set(block, to_full @ mid, mid.T)

        # the block's output, again at full width, unless it is the last (the head reads it so)
        spectra = {"stream_mid": mid_values.cpu().numpy()}
        out_error = 0.0
        if ctx.index < self.n_blocks - 1:
            out_values, out = self._pca(ctx, self._output_moment(ctx))
            out = out[:, : self.width]
            rotate_outputs(block, mlp_out, out)
            add_shortcuts(block, taps, d_in, self.width, self.width, **factory)
            self._set(block, to_full @ mid, mid.T @ out)
            spectra["stream_out"] = out_values.cpu().numpy()
            out_error = _dropped(out_values, self.width)
            self.basis = out
        else:
            self.basis = None
        errors = {"attn": _dropped(mid_values, self.width), "mlp": out_error}
        paths["attn"].append(SHORTCUTS[0])
        paths["mlp"].append(SHORTCUTS[1])
        d_out = self._widths(ctx.index, self.width)[2]
        kept = {"attn": self.width, "mlp": d_out}
        records = [
            unit_record(ctx, unit, kept[unit], d, before[unit], paths[unit], None, errors[unit], start)
            for unit in ("attn", "mlp")
        ]
        return BlockResult(records, spectra)

    @staticmethod
    def _set(block: nn.Module, attn_map: torch.Tensor, mlp_map: torch.Tensor) -> None:
        """The shortcut matrices (x·attn_map, h·mlp_map), stored as linears' weights (their T)."""
        with torch.no_grad():
            for name, matrix in zip(SHORTCUTS, (attn_map, mlp_map), strict=True):
                getattr(block, name).weight.copy_(matrix.T)

    def _mid_moment(self, ctx: BlockContext) -> SecondMoment:
        """Σhhᵀ of the stream between attention and MLP (the shortcut hook's sum, full width)."""
        acc = SecondMoment(
            self.hidden, self._device(ctx), f"block {ctx.index} stream between attention and MLP"
        )
        attention = ctx.block.get_submodule(self.taps["attn"])
        handle = attention.register_forward_hook(lambda m, args, out: acc.update(m._shrink_stash["h"]))
        try:
            with torch.no_grad():
                for b, x in enumerate(ctx.hidden):
                    ctx.run(x, b)
        finally:
            handle.remove()
        return acc

    def _output_moment(self, ctx: BlockContext) -> SecondMoment:
        acc = SecondMoment(self.hidden, self._device(ctx), f"block {ctx.index} output stream")
        for y in ctx.run_all(ctx.hidden):
            acc.update(y)
        return acc

    @staticmethod
    def _device(ctx: BlockContext) -> torch.device:
        return ctx.attention.linear("o").weight.device

    @staticmethod
    def _pca(ctx: BlockContext, acc: SecondMoment) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending) and eigenvectors of Σxxᵀ."""
        values, vectors = torch.linalg.eigh(acc.xtx)
        if not torch.isfinite(values).all():
            raise NumericalError(f"{acc.where}: the PCA of the stream is not finite")
        order = torch.argsort(values, descending=True)
        return values[order], vectors[:, order]


def _dropped(values: torch.Tensor, width: int) -> float:
    """The share of the stream's energy (Σ eigenvalues) in the directions sliced away."""
    total = float(values.clamp(min=0).sum())
    return float(values[width:].clamp(min=0).sum()) / total if total > 0 else 0.0
