"""`heal=kd`: distillation from the dense model (as in Minitron): the compressed model learns the
dense model's next-token distribution at every position, T²·KL(p_T ‖ p_S) at temperature T, plus
optionally the dense model's last hidden state. With `heal.cache_teacher=true` the teacher's
targets come from disk (`heal.teacher_cache`) and the KL is that of the distributions coarsened to
the teacher's `cache_top` likeliest tokens and one bin for the rest."""

from __future__ import annotations

import torch
from torch import nn

from .. import HEALERS
from ..base import Healer
from ..config import KdConf
from ..teacher_cache import LOG_PARTITION, LOG_REST, TOP_INDEX, TOP_VALUES


@HEALERS.register("kd", KdConf)
class Distill(Healer):
    needs_teacher = True

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: nn.Module | None
    ) -> torch.Tensor:
        ids, temperature = batch["input_ids"], float(self.cfg.temperature)
        if TOP_VALUES in batch:  # cached targets (hidden-state terms are refused with a cache)
            logits = student(input_ids=ids, use_cache=False).logits
            cached = (batch[TOP_VALUES], batch[TOP_INDEX], batch[LOG_PARTITION], batch[LOG_REST])
            return top_kl_loss(logits, *cached, temperature)
        assert teacher is not None, "heal=kd runs beside the dense model or its cached targets"
        hidden = float(self.cfg.hidden) > 0
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        device = out.logits.device  # a teacher spread by a device map answers on its last module's
        loss = kl_loss(out.logits, target.logits.to(device), temperature)
        if hidden:
            s, t = out.hidden_states[-1].float(), target.hidden_states[-1].float().to(device)
            loss = loss + float(self.cfg.hidden) * (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
        return loss


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over positions of KL(softmax(t/T) ‖ softmax(s/T)), in float32."""
    s = torch.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    t = torch.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    kl = nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def top_kl_loss(
    student: torch.Tensor,
    top: torch.Tensor,
    index: torch.Tensor,
    partition: torch.Tensor,
    rest: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """T² · mean over positions of the KL between teacher and student distributions coarsened to
    the teacher's kept tokens `index` and one bin for every other token. `top` are the teacher's
    tempered logits of those tokens, `partition` its tempered log-partition and `rest` the log of
    its tempered exp-sum over the others (−inf when none are left), all per position."""
    s = student.float().flatten(0, -2) / temperature
    index = index.flatten(0, -2).long()
    log_q = s - s.logsumexp(-1, keepdim=True)
    log_p_top = top.float().flatten(0, -2) - partition.float().flatten()[:, None]
    kept = (log_p_top.exp() * (log_p_top - log_q.gather(-1, index))).sum(-1)
    # the rest's bin; a finite floor instead of −inf keeps the gradient finite when nothing is left
    floor = torch.finfo(s.dtype).min
    log_q_rest = log_q.scatter(-1, index, floor).logsumexp(-1)
    log_p_rest = rest.float().flatten() - partition.float().flatten()
    p_rest = log_p_rest.exp()
    others = torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
    return (kept + others).mean() * temperature**2
