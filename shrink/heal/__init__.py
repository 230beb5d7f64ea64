"""Recovery after compression (`heal=lora|kd`): the compressed model trained end to end, through
peft and transformers' Trainer, and merged back into exactly its compressed structure. Healers
register in `HEALERS` where they are written; `heal=none` is no plug-in."""

from __future__ import annotations

from ..registry import Registry
from .base import Healer
from .config import HealConf

HEALERS: Registry[type[Healer]] = Registry("heal", f"{__name__}.losses", builtin=("none",))
HEALERS.store("heal", HealConf)

__all__ = ["HEALERS", "HealConf", "Healer"]
