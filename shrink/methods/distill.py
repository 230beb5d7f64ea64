"""`distill`: layer-wise low-rank feature distillation (Lillama; Sy, Cerisara & Illina, 2024).

Every compressible linear of a block becomes a rank-r pair initialised by `svd` (default) or
`svdllm`, with the ranks those methods take from the schedule. The pairs are then trained with
AdamW so that the block reproduces the dense block's output y = f(x_T) on the dense model's own
block inputs x_T; per token the loss is mean|y − ŷ| − log σ(cos(y, ŷ)). The student block reads
x_T (`inputs: teacher`), its own inputs x_S produced by the compressed blocks below it
(`student`; cached, so detached), or both with the two losses summed in one step
(`teacher+student`, the default): x_S lets the block correct the error accumulated below it,
x_T keeps it close to the dense function. Blocks go bottom first, so x_S exists when needed.

Only the factors train; norms, biases and linears kept dense stay frozen, and nothing outside
the block is touched. The loss over the whole calibration set is measured before training and
every `eval_every` steps; the best factors seen are kept, so a block never leaves worse (on that
loss) than its initialisation. A non-finite loss stops the block's training and is reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..blocks.context import BlockContext, BlockResult
from ..config import MethodConf
from ..errors import ShrinkError
from ..linalg.decompositions import output_error
from ..models.edits import LowRankLinear
from ..planning.budget import Curve, Sizes
from . import register
from .base import Method
from .svd import SVD
from .svdllm import SVDLLM

log = logging.getLogger("shrink")


def token_losses(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token mean|y − ŷ| − log σ(cos(y, ŷ)) over the feature dimension (float32)."""
    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().mean(dim=-1)
    cos = F.cosine_similarity(pred, target, dim=-1)
    return l1 - F.logsigmoid(cos)


class DistillInit(str, Enum):
    svd = "svd"  # truncated SVD of each weight (Lillama's choice)
    svdllm = "svdllm"  # whitened SVD on the block's calibration inputs


class DistillInputs(str, Enum):
    teacher = "teacher"  # the dense model's block inputs
    student = "student"  # the compressed model's own block inputs (detached)
    teacher_student = "teacher+student"  # both losses, summed, in one step (Lillama)


INPUT_CHOICES = [mode.value for mode in DistillInputs]


@dataclass
class DistillConf(MethodConf):
    name: str = "distill"
    init: DistillInit = DistillInit.svd
    ridge: float = 0.0  # init=svdllm: λ/mean(diag C), as in method=svdllm
    # a DistillInputs value; a plain string because OmegaConf matches enums by member name and
    # `teacher+student` is not a valid name (checked in shrink.validate)
    inputs: str = DistillInputs.teacher_student.value
    steps: int = 32  # AdamW steps per block
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2  # calibration windows per step (at most calib.batch_size)
    eval_every: int = 16  # steps between full calibration-loss checks; the best factors are kept


@register("distill", DistillConf)
class Distill(Method):
    has_profile = True  # the initialisation's error profile plans greedy / energy ranks
    factorises = True
    needs_teacher = True

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.check(cfg)
        if DistillInit(cfg.init) == DistillInit.svdllm:
            self.init = SVDLLM(OmegaConf.create({"name": "svdllm", "ridge": float(cfg.ridge)}))
        else:
            self.init = SVD(OmegaConf.create({"name": "svd"}))
        mode = DistillInputs(cfg.inputs)
        self.sources = {
            DistillInputs.teacher: ("teacher",),
            DistillInputs.student: ("student",),
            DistillInputs.teacher_student: ("teacher", "student"),
        }[mode]

    @staticmethod
    def check(cfg: DictConfig, calib_batch: int | None = None, propagate: str = "compressed") -> None:
        """The method's own value checks, so a bad setting fails before any model is loaded."""
        if cfg.inputs not in INPUT_CHOICES:
            choices = ", ".join(INPUT_CHOICES)
            raise ShrinkError(f"method.inputs={cfg.inputs!r} is not valid; choose one of {choices}")
        for key in ("steps", "eval_every", "batch_size"):
            least = 0 if key == "steps" else 1
            if int(cfg[key]) < least:
                raise ShrinkError(f"method.{key} must be ≥ {least}, got {cfg[key]}")
        if float(cfg.lr) <= 0 or float(cfg.weight_decay) < 0:
            raise ShrinkError(
                f"method.lr must be > 0 and method.weight_decay ≥ 0, got {cfg.lr} and {cfg.weight_decay}"
            )
        if calib_batch is not None and int(cfg.batch_size) > calib_batch:
            raise ShrinkError(
                f"method.batch_size={cfg.batch_size} exceeds calib.batch_size={calib_batch}: a step takes "
                "its windows from one cached calibration batch"
            )
        if propagate == "dense" and cfg.inputs != DistillInputs.teacher.value:
            raise ShrinkError(
                f"method.inputs={cfg.inputs!r} with propagate=dense: the student inputs would be the dense "
                "model's, the same as the teacher's; use propagate=compressed, or method.inputs=teacher"
            )

    @property  # type: ignore[override]
    def width_multiple(self) -> int:
        """The initialising method chooses the ranks, so it is the one that rounds them."""
        return self.init.width_multiple

    @width_multiple.setter
    def width_multiple(self, value: int) -> None:
        self.init.width_multiple = value

    def sizes(self, ctx: BlockContext) -> list[Sizes]:
        return self.init.sizes(ctx)

    def profile(self, ctx: BlockContext) -> list[Curve]:
        return self.init.profile(ctx)

    def compress_block(self, ctx: BlockContext) -> BlockResult:
        if ctx.teacher_hidden is None or ctx.teacher_outputs is None:
            raise ShrinkError("method 'distill' needs the dense model's block inputs (needs_teacher)")
        dense = {
            path: ctx.block.get_submodule(path).weight.detach().to(torch.float64).clone()
            for site in ctx.sites
            for path in site.linears
        }
        result = self.init.compress_block(ctx)
        pairs = [m for m in ctx.block.modules() if isinstance(m, LowRankLinear)]
        start = time.perf_counter()
        report = self._train(ctx, pairs) if pairs and int(self.cfg.steps) > 0 else {}
        report["distill_seconds"] = time.perf_counter() - start
        for row in result.records:
            row.update(report)
            row["rel_error_init"] = row["rel_error"]
            stats = ctx.stats.get(row["site"])
            module = ctx.block.get_submodule(row["linear"])
            if row["rank"] is not None and stats is not None and isinstance(module, LowRankLinear):
                w = dense[row["linear"]]
                delta = w - module.dense_weight().detach().to(torch.float64)
                row["rel_error"] = output_error(delta, w, stats.moment())
        return result

    def _inputs(self, ctx: BlockContext, source: str) -> list[torch.Tensor]:
        return ctx.teacher_hidden if source == "teacher" else ctx.hidden

    @torch.no_grad()
    def calibration_loss(self, ctx: BlockContext) -> float:
        """Mean token loss over every calibration window, summed over the configured input sources."""
        total = 0.0
        for source in self.sources:
            loss, tokens = 0.0, 0
            for b, x in enumerate(self._inputs(ctx, source)):
                per_token = token_losses(ctx.run(x, b), ctx.teacher_outputs[b])
                loss += float(per_token.sum())
                tokens += per_token.numel()
            total += loss / tokens
        return total

    def _train(self, ctx: BlockContext, pairs: list[LowRankLinear]) -> dict:
        params = [p for m in pairs for p in (m.first.weight, m.second.weight)]
        flags = [(p, p.requires_grad) for p in ctx.block.parameters()]
        ctx.block.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        size = int(self.cfg.batch_size)
        chunks = [
            (b, slice(s, min(s + size, len(x))))
            for b, x in enumerate(ctx.hidden)
            for s in range(0, len(x), size)
        ]
        gen = torch.Generator().manual_seed(torch.initial_seed() + ctx.index)
        opt = torch.optim.AdamW(params, lr=float(self.cfg.lr), weight_decay=float(self.cfg.weight_decay))
        steps, every = int(self.cfg.steps), int(self.cfg.eval_every)
        init = best = self.calibration_loss(ctx)
        best_step, kept = 0, [p.detach().clone() for p in params]
        order: list[int] = []
        done, stopped = 0, None
        try:
            for step in range(1, steps + 1):
                if not order:
                    order = torch.randperm(len(chunks), generator=gen).tolist()
                b, rows = chunks[order.pop()]
                target = ctx.teacher_outputs[b][rows]
                loss = sum(
                    token_losses(ctx.run(self._inputs(ctx, src)[b][rows], b, rows), target).mean()
                    for src in self.sources
                )
                if not torch.isfinite(loss):
                    stopped = f"non-finite loss at step {step}"
                    log.warning("distill block %d: %s; keeping the best factors seen", ctx.index, stopped)
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done = step
                if step % every == 0 or step == steps:
                    current = self.calibration_loss(ctx)
                    if current < best:
                        best, best_step, kept = current, step, [p.detach().clone() for p in params]
        finally:
            with torch.no_grad():
                for p, value in zip(params, kept, strict=True):
                    p.copy_(value)
            for p, flag in flags:
                p.requires_grad_(flag)
        log.info(
            "distill block %d: loss %.4f -> %.4f (best at step %d of %d)",
            ctx.index,
            init,
            best,
            best_step,
            done,
        )
        return {
            "distill_loss_init": init,
            "distill_loss": best,
            "distill_best_step": best_step,
            "distill_steps": done,
            "distill_stopped": stopped,
        }
