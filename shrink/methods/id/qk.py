"""Thinner queries and keys for `id`: which q/k dims each KV group keeps, and what
dropping the rest costs the attention output.

A head's score is q·k = Σᵢ qᵢkᵢ, a sum over its dims (with rotary embeddings, over pairs that turn
together), so keeping a subset of dims in both q and k approximates every score. The subset is
MoDeGPT's CR choice: the dims with the largest ‖X wq_i‖·‖X wk_i‖ (the bound on their share of the
scores), summed over the query heads of a KV group, which share the key head and so its dims.
The score error passes through the softmax, so its effect on the attention output is measured,
not modelled: the block runs with the dropped q/k rows zeroed, exactly what the thinned layers
compute, and the output projection is refitted to the unthinned attention output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ...blocks.context import BlockContext
from ...linalg.moments import CrossMoment, SecondMoment
from ...models import Attention
from ...models.edits import head_places


def qk_widths(attention: Attention, widths: list[int]) -> list[int]:
    """The widths (from `widths`) that whole q/k units can fill."""
    assert attention.qk_units is not None, "checked before compression (Method.check_model)"
    size = len(attention.qk_units[0])
    return [w for w in widths if w % size == 0]


def _row_energies(linear: torch.nn.Linear, stats: SecondMoment) -> torch.Tensor:
    """Σ over calibration tokens of each output's square, (Wx + b)ᵢ², from the input moments."""
    w = linear.weight.detach().to(torch.float64)
    energy = ((w @ stats.xtx) * w).sum(1)
    if linear.bias is not None:
        b = linear.bias.detach().to(torch.float64)
        energy = energy + 2 * b * (w @ stats.sum) + stats.count * b * b
    return energy.clamp_min(0)


def qk_scores(attention: Attention, stats: SecondMoment) -> torch.Tensor:
    """(KV heads × units) CR importance: Σ over the group's query heads of ‖q_u‖·‖k_u‖, a unit's
    norms taken over its dims and the calibration tokens (rotation keeps a pair's norm)."""
    units = torch.tensor(attention.qk_units, dtype=torch.long)
    n_heads, n_kv = attention.counts()
    dh = attention.head_dim
    q = _row_energies(attention.linear("q"), stats).view(n_heads, dh)[:, units].sum(-1).sqrt()
    k = _row_energies(attention.linear("k"), stats).view(n_kv, dh)[:, units].sum(-1).sqrt()
    return (q.view(n_kv, n_heads // n_kv, -1) * k[:, None, :]).sum(1)


def qk_positions(
    attention: Attention, stats: SecondMoment, width: int, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """(KV heads × width) sorted dims each KV head (and its query heads) keeps: its best units
    (by `scores`, computed from `stats` when not given)."""
    units = torch.tensor(attention.qk_units, dtype=torch.long)
    count = width // units.shape[1]
    scores = qk_scores(attention, stats) if scores is None else scores
    best = scores.topk(count, dim=1).indices
    return units[best].flatten(1).sort(dim=1).values


@contextlib.contextmanager
def zeroed_qk(attention: Attention, positions: torch.Tensor) -> Iterator[None]:
    """q and k with every dim outside `positions` zeroed (weights and biases), as the thinned,
    zero-padded layers compute them; restored on exit."""
    n_heads, n_kv = attention.counts()
    dh = attention.head_dim
    saved = []
    try:
        for name, places in (("q", positions.repeat_interleave(n_heads // n_kv, 0)), ("k", positions)):
            linear = attention.linear(name)
            drop = torch.ones(linear.out_features, dtype=torch.bool)
            drop[head_places(places.cpu(), dh)] = False
            drop = drop.to(linear.weight.device)
            saved.append(
                (
                    linear,
                    linear.weight.detach().clone(),
                    None if linear.bias is None else linear.bias.detach().clone(),
                )
            )
            with torch.no_grad():
                linear.weight[drop] = 0
                if linear.bias is not None:
                    linear.bias[drop] = 0
        yield
    finally:
        with torch.no_grad():
            for linear, weight, bias in saved:
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)


def attention_output(
    ctx: BlockContext, hidden: torch.Tensor, batch: int, rows: slice | None = None
) -> torch.Tensor:
    """The input of the output projection when the block runs on `hidden` (batch `batch`)."""
    return ctx.linear_input(ctx.attention.paths.o, hidden, batch, rows)


def _probe_batches(ctx: BlockContext, windows: int) -> list[tuple[torch.Tensor, int, slice | None]]:
    """The first `windows` calibration windows, as (hidden, batch, rows) calls."""
    calls, left = [], windows
    for b, h in enumerate(ctx.hidden):
        if left <= 0:
            break
        n = min(left, h.shape[0])
        calls.append((h[:n], b, slice(0, n) if n < h.shape[0] else None))
        left -= n
    return calls


def qk_errors(
    ctx: BlockContext, stats: SecondMoment, weights: torch.Tensor, widths: list[int], windows: int
) -> dict[int, float]:
    """Width -> squared relative error of the attention output, columns weighted by `weights` (o's
    column norms, as the ID's), with q/k thinned to that width, on `windows` calibration windows.
    In the ID's currency: √(e_values² + e_qk²) prices an option that thins both."""
    dh = ctx.attention.head_dim
    calls = _probe_batches(ctx, windows)
    dense = [attention_output(ctx, *call) for call in calls]
    total = sum(float(((z.to(torch.float64) * weights) ** 2).sum()) for z in dense)
    errors = {dh: 0.0}
    scores = qk_scores(ctx.attention, stats)
    for width in widths:
        if width >= dh:
            continue
        with zeroed_qk(ctx.attention, qk_positions(ctx.attention, stats, width, scores)):
            diff = sum(
                float((((attention_output(ctx, *call) - z).to(torch.float64) * weights) ** 2).sum())
                for call, z in zip(calls, dense, strict=True)
            )
        errors[width] = diff / total if total > 0 else 0.0
    return errors


def thinned_moments(
    ctx: BlockContext, positions: torch.Tensor, dense_target: bool, batch_dtype: torch.dtype
) -> CrossMoment:
    """Moments of the attention output with q/k thinned to `positions` (x) against the unthinned
    one (y), on every calibration batch: the fold then refits o_proj to undo part of the score
    error. With `dense_target` y is the dense model's (the unedited block on the dense stream)."""
    o = ctx.attention.linear("o")
    where = f"block {ctx.index} attn_out (thinned q/k)"
    cross = CrossMoment(o.in_features, o.weight.device, where, batch_dtype)
    targets = ctx.teacher_hidden if dense_target else ctx.hidden
    assert targets is not None, "dense targets come with the dense stream (needs_teacher)"
    for b, (x, y) in enumerate(zip(ctx.hidden, targets, strict=True)):
        target = attention_output(ctx, y, b)
        with zeroed_qk(ctx.attention, positions):
            cross.update(attention_output(ctx, x, b), target)
    return cross
