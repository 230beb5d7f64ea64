"""What heal trains, and how it goes back into the compressed model.

The targets are the plain linears of the block linears (a factor pair's two factors, each on its
own). LoRA comes from peft, with one layer class of shrink's for every linear: it adds the update
where the layer's own layout puts its outputs (a padded head projection pads it like its stored
rows, a sliced output projection reads the same part of its input) and keeps the zeros of a sparse
linear at zero (a sparse model stays sparse). Merging writes the update into the stored
weight, so the healed model has the compressed structure, parameter count and checkpoint layout.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from ..models.edits import HeadPaddedLinear, HeadSlicedLinear


class ShrinkLoraLinear(LoraLinear):
    """peft's LoRA linear, through the layout of shrink's head projections and keeping zeros."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        result = base(x, *args, **kwargs)
        read = base.select(x) if isinstance(base, HeadSlicedLinear) else x
        update = None
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            read = read.to(self.lora_A[name].weight.dtype)
            mask = getattr(base, "heal_mask", None)
            if mask is None:
                part = (
                    self.lora_B[name](self.lora_A[name](self.lora_dropout[name](read))) * self.scaling[name]
                )
            else:  # a sparse linear: the update reaches only the weights that are not zero
                delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name] * mask
                part = nn.functional.linear(self.lora_dropout[name](read), delta)
            update = part if update is None else update + part
        if update is None:
            return result
        if isinstance(base, HeadPaddedLinear):
            update = base.pad(update)
        return result + update.to(result.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        mask = getattr(self.get_base_layer(), "heal_mask", None)
        return delta if mask is None else delta * mask.to(delta.dtype)


# A linear is sparse (its zeros a mask to keep) when at least this share of its weights is exactly
# zero: sparsity steps leave 25% and more, while a dense pretrained weight stored in bfloat16 has a
# few exact zeros by chance (about 0.03% in SmolLM2), which are no mask.
SPARSE_SHARE = 0.01


def _mark_zeros(linears: dict[str, nn.Linear]) -> list[nn.Linear]:
    """Give every sparse target a mask of its nonzero weights (a plain attribute, so it never
    reaches a checkpoint); returns the masked ones."""
    masked = []
    for linear in linears.values():
        zeros = linear.weight.detach() == 0
        if float(zeros.float().mean()) >= SPARSE_SHARE:
            linear.heal_mask = (~zeros).to(linear.weight.dtype)
            masked.append(linear)
    return masked


def _unmark(linears: dict[str, nn.Linear]) -> None:
    for linear in linears.values():
        if hasattr(linear, "heal_mask"):
            del linear.heal_mask


def with_lora(
    model: nn.Module, linears: dict[str, nn.Linear], rank: int, alpha: float, dropout: float
) -> PeftModel:
    """The model wrapped by peft with a LoRA adapter on each target (B starts at zero, so the
    wrapped model computes what the compressed one does)."""
    _mark_zeros(linears)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(linears), bias="none"
    )
    config._register_custom_module({nn.Linear: ShrinkLoraLinear})
    return get_peft_model(model, config)


def merge_lora(wrapped: PeftModel, linears: dict[str, nn.Linear]) -> nn.Module:
    """Each adapter merged into its linear's stored weight; the plain compressed model back."""
    model = wrapped.merge_and_unload()
    _unmark(linears)
    return model


def train_full(model: nn.Module, linears: dict[str, nn.Linear]) -> list[torch.utils.hooks.RemovableHandle]:
    """Train the targets' own weights and biases, nothing else; a zero of a sparse linear gets no
    gradient, so it stays zero under AdamW (its moments stay zero, and decay of zero is zero).
    Returns the hooks to remove when done."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for linear in linears.values():
        for parameter in (linear.weight, linear.bias):
            if parameter is not None:
                parameter.requires_grad_(True)
    handles = []
    for linear in _mark_zeros(linears):
        mask = linear.heal_mask
        handles.append(linear.weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def end_full(model: nn.Module, linears: dict[str, nn.Linear], handles: list) -> None:
    for handle in handles:
        handle.remove()
    _unmark(linears)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
