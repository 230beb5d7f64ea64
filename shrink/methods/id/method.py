"""`id`: STAT — structured pruning by interpolative decomposition (Chee et al., model-preserving).

FFN: Z is the input of the down projection (post-activation hidden units). A column ID
Z ≈ Z[:, J] T picks the neurons J to keep; columns are weighted by the norms of their outgoing
weights so the selection minimises the block's output error. The kept neurons' rows of up/gate
(fc1) stay, the correction folds into the next layer: W_down ← W_down Tᵀ.

Heads: Z is the attention output (input of o_proj); each head's slice is one block of columns.
Heads are chosen by the block version of the same greedy ID, dropped heads are reconstructed
from all kept head dimensions by least squares (T folded into o_proj), and q/k/v rows are sliced.
With grouped-query attention every kept KV group keeps the same number of query heads, and a KV
head goes only with all of its query heads.

Thinner heads (`attention`): a query head's output is A_h V_g, so an ID of the value
dims of KV head g (V_g ≈ V_g[:, J] T) carries over to every query head of the group; v keeps rows
J, o keeps the matching columns, and the same least-squares fold rebuilds o_proj's inputs. `auto`
(default) thins values and keeps whole-head drops as the schedule's reserve options.
`qk_dims` also thins queries and keys: each KV group keeps the rotary pairs (or dims) with the
largest ‖q‖·‖k‖ (MoDeGPT's CR choice, `id_qk.py`); their effect through the softmax is measured on
a few calibration windows, and o_proj is refitted to the unthinned attention output.

The pivoted QR of Z selects the same columns as the pivoted Cholesky of ZᵀZ, so the streamed
second moment is enough; `selection: sketch_qr` runs pivoted QR on a streamed Gaussian row
sketch ΩZ instead, as a check. T always comes from the exact Gram matrix.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from omegaconf import DictConfig

from ...blocks.context import BlockContext, BlockResult
from ...config import FoldTarget
from ...errors import ShrinkError
from ...linalg.decompositions import (
    block_pivoted_cholesky,
    column_major,
    fold,
    fold_error,
    pivoted_cholesky,
    pivoted_qr,
)
from ...linalg.moments import CrossMoment, SecondMoment
from ...linalg.ridge import held_aside_pieces, ridge_from_pieces
from ...models import Adapter, Site
from ...models.edits import keep_outputs, set_inputs, thin_heads, thin_query_key
from ...planning.budget import Curve, Option, Sizes
from ...planning.cost import HeadCosts, module_cost
from .. import register
from ..base import Method
from ..units import ffn_costs, neuron_sizes, site_fraction, unit_record
from .attention import Shape, attention_options, candidates, group_constraint, sketch_heads, value_dims
from .config import AttentionUnits, IDConf, IDSelection, check_keys
from .qk import qk_errors, qk_positions, qk_widths, thinned_moments


@register("id", IDConf)
class InterpolativeDecomposition(Method):
    has_profile = True
    residual_units = True  # FFN neurons (through down_proj) and heads (through o_proj)

    @staticmethod
    def check(cfg: DictConfig, calib_batch: int | None = None, propagate: str = "compressed") -> None:
        check_keys(cfg, propagate)

    def check_model(self, adapter: Adapter) -> None:
        """Thinner queries and keys need a family whose q/k dims can be zero-padded."""
        if not (self.cfg.qk_dims and self.cfg.heads):
            return
        if any(adapter.attention(block).qk_units is None for block in adapter.blocks()):
            raise ShrinkError(
                f"method.qk_dims=true: {adapter.config.model_type} normalises (or partly rotates) each "
                "head's queries and keys, so they cannot be thinned; set method.qk_dims=false"
            )

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        """Dense targets need the dense model's activations beside the propagated ones."""
        return self.cfg.target == FoldTarget.dense

    def new_stats(
        self, site: Site, dim: int, device: torch.device, where: str, seed: int
    ) -> SecondMoment | None:
        """Only the inputs of down_proj and o_proj (the ID's columns) are read, and q/k's with
        `qk_dims` (their norms choose the kept dims); `selection: sketch_qr` also streams a
        Gaussian row sketch ΩZ of the ID's columns."""
        qk = self.cfg.qk_dims and self.cfg.heads and site.name == "attn_in"
        if site.name not in ("mlp_out", "attn_out") and not qk:
            return None
        rows = 0
        if self.cfg.selection == IDSelection.sketch_qr and not qk:
            rows = max(1, int(self.cfg.sketch_oversample * dim))
        dtype = torch.float32 if self.cfg.batch_gram_fp32 else torch.float64
        parts = 0 if qk else int(self.cfg.ridge_cv)
        return SecondMoment(
            dim, device=device, where=where, sketch_rows=rows, seed=seed, batch_dtype=dtype, parts=parts
        )

    def compress_block(self, ctx: BlockContext) -> BlockResult:
        """Heads first, then neurons: the block as a whole keeps at most its target.

        Heads come in coarse units (a whole head, or a KV group under GQA), so the head count
        rarely lands on its share exactly; the FFN, last, gets whatever the block's allowance
        leaves, so the per-block fraction is met as closely as the granularity allows.
        """
        records, spectra = [], {}
        cross: dict[str, CrossMoment] = {}
        if self.cfg.target == FoldTarget.dense:  # measured before any edit of this block
            cross = ctx.cross_moments(
                [n for n, on in (("attn_out", self.cfg.heads), ("mlp_out", self.cfg.ffn)) if on]
            )
        allowance = sum(ctx.targets[s.name] * ctx.price(s.name) for s in ctx.sites)
        attn_cost = ctx.price("attn_in", "attn_out")
        ffn_cost = ctx.price("mlp_in", "mlp_out")
        dense = attn_cost + ffn_cost
        # with `ctx.scratch` a wide FFN's XᵀX waits on disk through the whole block: the heads'
        # step, the FFN's selection Gram and its fold's systems need the memory, and the FFN step
        # reads it by rows
        ffn_stats = ctx.stats.get("mlp_out")
        aside = ffn_stats.set_aside(ctx.scratch) if ffn_stats is not None else contextlib.nullcontext()
        with aside:
            if self.cfg.heads:
                share = (
                    site_fraction(ctx, ("attn_in", "attn_out"))
                    if self.cfg.ffn
                    else (allowance - ffn_cost) / attn_cost
                )
                records.append(self._prune_heads(ctx, spectra, share, cross.get("attn_out")))
                attn_cost = ctx.price("attn_in", "attn_out")
            if self.cfg.ffn:
                records.append(
                    self._prune_ffn(ctx, spectra, (allowance - attn_cost) / ffn_cost, cross.get("mlp_out"))
                )
        if not self.cfg.ffn and "mlp" in ctx.choices:
            raise ShrinkError("the plan chose FFN widths but method.ffn is false")
        kept = ctx.price(*(s.name for s in ctx.sites))
        if kept > allowance + 1e-6:
            raise ShrinkError(
                f"block {ctx.index}: id with ffn={self.cfg.ffn}, heads={self.cfg.heads} keeps "
                f"{kept / dense:.3f} of the block, over its target {allowance / dense:.3f}; "
                "raise the budget or let id prune both neurons and heads"
            )
        return BlockResult(records, spectra)

    def _selection_gram(self, stats: SecondMoment, next_linear) -> torch.Tensor:
        """What the greedy selection reads: Z_wᵀZ_w with columns weighted by their outgoing norms;
        centred when the fold is affine (its error is what the centred Schur complement leaves)."""
        w = self._weights(next_linear)
        # one new matrix (1 GB at 11008 wide), filled from XᵀX even while it is set aside
        gram = stats.xtx_into(column_major(torch.Size([stats.dim, stats.dim]), w))
        if self.cfg.bias:
            mean = stats.mean()
            for start in range(0, stats.dim, 1024):  # centred a slab at a time
                gram[start : start + 1024].sub_(stats.count * torch.outer(mean[start : start + 1024], mean))
        return gram.mul_(w[:, None]).mul_(w[None, :])

    def _output_energy(self, stats: SecondMoment, next_linear) -> float | None:
        """With an affine fold the selection works on centred moments, whose residuals are then
        measured against the uncentred energy, as without it (None: the selection's own total)."""
        if not self.cfg.bias:
            return None
        w = self._weights(next_linear)
        return float((torch.diagonal(stats.xtx) * w * w).sum())

    def _fold(
        self, stats: SecondMoment, keep: torch.Tensor, linear, cross: CrossMoment | None, refit: bool = False
    ):
        """(new weight of the next layer, its new bias or None, relative output error, the relative
        ridge used). STAT's fold when neither switch is on (`linalg.fold`); with `ridge_cv` the
        plain fold's held-out error over groups of windows picks the ridge of any fold but a
        `refit`; nothing to fold when every column is kept, unless `refit` (thinner q/k). Reads
        XᵀX by rows only (`SecondMoment.rows`), so it may be set aside."""
        w = linear.weight.detach().to(torch.float64)
        if len(keep) == w.shape[1] and not refit:
            return w, None, 0.0, None
        ridge = float(self.cfg.ridge)
        if stats.groups and not refit:  # chosen on the plain fold's problem, used by whichever fold runs
            ridge = ridge_from_pieces(held_aside_pieces(stats.part_rows, stats.groups, keep, w)).ridge
        folded = fold(stats, keep, ridge, self.cfg.bias, cross)
        new, shift = w @ folded.t.T, folded.shift
        del folded  # T is k × n: freed before the error's products
        bias = None
        if shift is not None:
            old = linear.bias.detach().to(torch.float64) if linear.bias is not None else 0.0
            bias = old + w @ shift
        return new, bias, fold_error(w, new, keep, shift, stats, cross), ridge

    def _weights(self, next_linear) -> torch.Tensor:
        if not self.cfg.weight_by_outgoing:
            return torch.ones(next_linear.in_features, dtype=torch.float64, device=next_linear.weight.device)
        return next_linear.weight.detach().to(torch.float64).norm(dim=0)

    # ---- FFN neurons -------------------------------------------------------------------------
    def _prune_ffn(
        self, ctx: BlockContext, spectra: dict, fraction: float, cross: CrossMoment | None
    ) -> dict:
        """Keep the neurons the schedule chose (Plan.choices), else as many as `fraction` allows."""
        start = time.perf_counter()
        site_in, site_out = ctx.site("mlp_in"), ctx.site("mlp_out")
        down = ctx.block.get_submodule(site_out.linears[0])
        paths = [*site_in.linears, site_out.linears[0]]
        before = [module_cost(ctx.block.get_submodule(p)) for p in paths]
        costs = ffn_costs(ctx, self.cfg.bias)
        n = costs.neurons
        if "mlp" in ctx.choices:
            k = int(ctx.choices["mlp"]["neurons"])
        else:
            dense, allowed = costs.of(n), fraction * costs.of(n)
            k = n if allowed >= dense else int((allowed - costs.fixed - costs.added) // costs.per_neuron)
        if k < n:
            k -= k % self.width_multiple
        if k < 1:
            raise ShrinkError(
                f"block {ctx.index}: after the heads, the FFN's share ({fraction:.4f}) cannot keep even one "
                "neuron; raise the budget"
            )

        stats = ctx.stats[site_out.name]  # read by rows: it may be set aside (compress_block)
        pivots = pivoted_cholesky(self._selection_gram(stats, down), n, consume=True)
        spectra["mlp_out.id_residuals"] = pivots.r_diag.cpu().numpy()
        order = pivots.order
        if self.cfg.selection == IDSelection.sketch_qr:
            order = pivoted_qr(stats.sketch * self._weights(down)[None, :], k)
        keep = order[:k].sort().values.to(stats.sum.device)
        new_down, new_bias, error, ridge = self._fold(stats, keep, down, cross)
        for path in site_in.linears:
            keep_outputs(ctx.block, path, keep)
        set_inputs(ctx.block, site_out.linears[0], new_down, new_bias)
        return unit_record(ctx, "mlp", k, n, before, paths, fraction, error, start, ridge=ridge)

    # ---- attention heads ---------------------------------------------------------------------
    def _candidates(self, costs: HeadCosts, ctx: BlockContext) -> list[Shape]:
        step = math.lcm(int(self.cfg.dims_step), self.width_multiple)
        widths = qk_widths(ctx.attention, costs.widths(step)) if self.cfg.qk_dims else None
        offered = candidates(AttentionUnits(self.cfg.attention), costs, step, widths)
        return [s for s in offered if (s.m * s.q * s.v) % self.width_multiple == 0]  # o_proj's inputs

    def _attention_options(self, ctx: BlockContext, costs: HeadCosts) -> list[Option]:
        """Every shape on offer with its cost and ID error (thinner q/k's error measured)."""
        o_lin = ctx.attention.linear("o")
        stats = ctx.stats["attn_out"]
        gram = self._selection_gram(stats, o_lin)
        offered = self._candidates(costs, ctx)
        measured = None
        if self.cfg.qk_dims:
            widths = sorted({s.qk for s in offered})
            windows = int(self.cfg.qk_probe_windows)
            measured = qk_errors(ctx, ctx.stats["attn_in"], self._weights(o_lin), widths, windows)
        return attention_options(costs, gram, self._output_energy(stats, o_lin), offered, measured)

    def _head_plan(self, ctx: BlockContext, fraction: float) -> tuple[int, int, int, int]:
        """(kept KV groups m, query heads per group q, value width, query/key width): the
        schedule's choice (Plan.choices) if it made one. Else, with `both` or thinner queries and
        keys, the least error within the target; otherwise the largest cost within it (STAT's rule
        for heads; for `dims` the widest values), reserves (`auto`'s whole-head drops) only when
        nothing else fits. The cheapest option when nothing fits, whose excess the FFN then pays."""
        dh = ctx.attention.head_dim
        if "attn" in ctx.choices:
            c = ctx.choices["attn"]
            m, q = int(c["kv_groups"]), int(c["heads_per_group"])
            return m, q, int(c.get("v_width", dh)), int(c.get("qk_width", dh))
        costs = ctx.costs.heads(ctx.attention, self.cfg.bias)
        allowed = fraction * costs.of(costs.n_kv, costs.group)
        if self.cfg.attention == AttentionUnits.both or self.cfg.qk_dims:
            options = self._attention_options(ctx, costs)
            for reserve in (False, True):
                fits = [o for o in options if o.reserve == reserve and o.cost <= allowed + 1e-9]
                if fits:
                    c = min(fits, key=lambda o: (o.error, -o.cost)).choice
                    break
            else:
                c = min(options, key=lambda o: o.cost).choice
            return int(c["kv_groups"]), int(c["heads_per_group"]), int(c["v_width"]), int(c["qk_width"])
        shapes = self._candidates(costs, ctx)
        for reserve in (False, True):
            fits = [
                ((costs.of(s.m, s.q, s.v), s.m * s.q, s.v), s)
                for s in shapes
                if s.reserve == reserve and costs.of(s.m, s.q, s.v) <= allowed + 1e-9
            ]
            if fits:
                return max(fits)[1][:4]
        return min(shapes, key=lambda s: costs.of(s.m, s.q, s.v))[:4]

    def _prune_heads(
        self, ctx: BlockContext, spectra: dict, fraction: float, cross: CrossMoment | None
    ) -> dict:
        start = time.perf_counter()
        attention = ctx.attention
        o_lin = attention.linear("o")
        paths = [attention.paths.q, attention.paths.k, attention.paths.v, attention.paths.o]
        before = [module_cost(ctx.block.get_submodule(p)) for p in paths]
        n_heads, n_kv = attention.counts()
        group, dh = n_heads // n_kv, attention.head_dim
        m, q, width, qk = self._head_plan(ctx, fraction)

        stats = ctx.stats["attn_out"]
        positions = None
        if qk < dh:  # every head is kept (candidates); o is refitted to the unthinned output
            positions = qk_positions(attention, ctx.stats["attn_in"], qk)
            dtype = torch.float32 if self.cfg.batch_gram_fp32 else torch.float64
            cross = thinned_moments(ctx, positions, self.cfg.target == FoldTarget.dense, dtype)
            stats = cross.x
        device = stats.xtx.device
        eligible = group_constraint(n_heads, n_kv, m, q)

        gram = None
        if self.cfg.selection == IDSelection.sketch_qr:
            heads = sketch_heads(stats.sketch * self._weights(o_lin)[None, :], dh, m * q, eligible)
        else:
            gram = self._selection_gram(stats, o_lin)
            picked = block_pivoted_cholesky(gram, dh, m * q, eligible)
            heads = list(picked.order)
            spectra["attn_out.head_residuals"] = picked.r_diag.cpu().numpy()
        heads = sorted(heads)  # grouped by KV head in order, as repeat_kv expects
        kv_kept = sorted({h // group for h in heads})
        kept_dims = value_dims(gram, heads, group, dh, width)  # value dims kept per KV head
        columns = torch.cat([h * dh + kept_dims[h // group] for h in heads]).to(device)
        new_o, new_bias, error, ridge = self._fold(stats, columns, o_lin, cross, refit=positions is not None)

        full = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in heads]).to(device)
        kv_full = torch.cat([torch.arange(g * dh, (g + 1) * dh) for g in kv_kept]).to(device)
        if positions is None:
            keep_outputs(ctx.block, attention.paths.q, full)
            keep_outputs(ctx.block, attention.paths.k, kv_full)
        else:
            thin_query_key(ctx.block, attention.paths.q, attention.paths.k, positions, group)
        if width < dh:
            v_rows = torch.cat([g * dh + kept_dims[g] for g in kv_kept])
            thin_heads(
                ctx.block,
                attention.paths.v,
                attention.paths.o,
                v_rows,
                new_o,
                new_bias,
                len(kv_kept),
                len(heads),
                width,
                dh,
            )
        else:
            keep_outputs(ctx.block, attention.paths.v, kv_full)
            set_inputs(ctx.block, attention.paths.o, new_o, new_bias)
        attention.set_counts(len(heads), len(kv_kept))
        return unit_record(
            ctx,
            "attn",
            len(heads),
            n_heads,
            before,
            paths,
            fraction,
            error,
            start,
            kept_kv=len(kv_kept),
            v_width=width,
            qk_width=qk,
            ridge=ridge,
        )

    # ---- error profiles for the greedy schedule ---------------------------------------------------
    def sizes(self, ctx: BlockContext) -> list[Sizes]:
        """The attention shapes and FFN widths on offer (as `profile` offers them), priced."""
        units = []
        if self.cfg.heads:
            costs = ctx.costs.heads(ctx.attention, self.cfg.bias)
            prices = tuple(costs.of(s.m, s.q, s.v, s.qk) for s in self._candidates(costs, ctx))
            units.append(
                Sizes(ctx.index, "attn", ("attn_in", "attn_out"), ctx.price("attn_in", "attn_out"), prices)
            )
        if self.cfg.ffn:
            costs = ffn_costs(ctx, self.cfg.bias)
            prices = tuple(costs.of(k) for k in neuron_sizes(costs.neurons, self.width_multiple))
            units.append(
                Sizes(ctx.index, "mlp", ("mlp_in", "mlp_out"), ctx.price("mlp_in", "mlp_out"), prices)
            )
        return units

    def profile(self, ctx: BlockContext) -> list[Curve]:
        """Every size this block could take, with its ID error, normalised per unit.

        FFN: keeping the first k pivots of the weighted problem leaves the Schur complement's trace
        (exactly ‖Z_w − P_J Z_w‖²_F; each |R_jj|² is its drop at one pick), so keeping k neurons
        has relative error √(remaining_k / remaining_0). Heads: the same block selection as at
        compression time for every (kept KV groups, heads per group), with its relative error.
        Each curve carries its output energy per token (the selection's weighted measure
        Σⱼ‖W:,ⱼ‖²E[zⱼ²]) and the residual stream's, for `schedule.error=residual|downstream`.
        """
        curves = []
        assert ctx.outputs is not None, "the runner gives profiles the block's outputs"
        residual = (ctx.residual_energy(), ctx.residual_energy(ctx.outputs))
        if self.cfg.heads:
            o_lin = ctx.attention.linear("o")
            gram = self._selection_gram(ctx.stats["attn_out"], o_lin)
            total = self._output_energy(ctx.stats["attn_out"], o_lin)
            energy = (total or float(torch.diagonal(gram).sum())) / max(ctx.stats["attn_out"].count, 1)
            costs = ctx.costs.heads(ctx.attention, self.cfg.bias)
            options = self._attention_options(ctx, costs)
            dense = ctx.price("attn_in", "attn_out")
            curves.append(Curve(ctx.index, "attn", ("attn_in", "attn_out"), dense, options, energy, residual))
        if self.cfg.ffn:
            down = ctx.block.get_submodule(ctx.site("mlp_out").linears[0])
            stats = ctx.stats["mlp_out"]
            costs = ffn_costs(ctx, self.cfg.bias)
            output_energy = self._output_energy(stats, down)
            with stats.set_aside(ctx.scratch):  # the Gram alone in memory (a streamed wide FFN)
                gram = self._selection_gram(stats, down)
                left = pivoted_cholesky(gram, costs.neurons, consume=True).remaining
                del gram
            total = output_energy or float(left[0])
            total = total if total > 0 else 1.0
            errors = (left[1:].clamp_min(0) / total).sqrt().tolist()
            sizes = neuron_sizes(costs.neurons, self.width_multiple)
            options = [Option(costs.of(k), errors[k - 1], {"neurons": k}) for k in sizes]
            dense = ctx.price("mlp_in", "mlp_out")
            energy = total / max(stats.count, 1)
            curves.append(Curve(ctx.index, "mlp", ("mlp_in", "mlp_out"), dense, options, energy, residual))
        return curves

    @property
    def prunes_heads(self) -> bool:
        return bool(self.cfg.heads)
