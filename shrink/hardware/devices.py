"""Device names from configs and callers, checked once: a device that is not there fails with one
line instead of deep inside torch."""

from __future__ import annotations

import torch

from ..errors import ShrinkError


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` → the GPU when there is one, else the CPU; `cuda` (or `cuda:N`) without a GPU fails."""
    name = str(getattr(name, "value", name))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ShrinkError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShrinkError(f"device {name!r} requested but no CUDA device is available; valid here: auto, cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ShrinkError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
