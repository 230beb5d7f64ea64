"""`heal=kd`: distillation from the dense model (as in Minitron): the compressed model learns the
dense model's next-token distribution at every position, T²·KL(p_T ‖ p_S) at temperature T, plus
optionally the dense model's last hidden state."""

from __future__ import annotations

import torch
from torch import nn

from .. import HEALERS
from ..base import Healer
from ..config import KdConf


@HEALERS.register("kd", KdConf)
class Distill(Healer):
    needs_teacher = True

    def loss(self, student: nn.Module, ids: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
        assert teacher is not None, "heal=kd runs beside the dense model"
        hidden = float(self.cfg.hidden) > 0
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        loss = kl_loss(out.logits, target.logits, float(self.cfg.temperature))
        if hidden:
            s, t = out.hidden_states[-1].float(), target.hidden_states[-1].float()
            loss = loss + float(self.cfg.hidden) * (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
        return loss


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over positions of KL(softmax(t/T) ‖ softmax(s/T)), in float32."""
    s = torch.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    t = torch.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    kl = nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2
