"""Method registry: the config file name, the registry key and `cfg.method.name` are one string."""

from __future__ import annotations

from omegaconf import DictConfig

from ..errors import ShrinkError
from .base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def check_method(name: str) -> None:
    if name not in METHODS:
        raise ShrinkError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")


def build_method(cfg: DictConfig) -> Method:
    check_method(cfg.name)
    return METHODS[cfg.name](cfg)


from . import distill, id, rom, svd, svdllm  # noqa: E402,F401  (register themselves)

__all__ = ["METHODS", "Method", "build_method", "check_method", "register"]
