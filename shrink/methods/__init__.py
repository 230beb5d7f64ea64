"""Methods by name: the config file name, the registry key and `cfg.method.name` are one string.

A method registers once, where it is written, with its schema: `@register("svd", SVDConf)`."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from ..config import MethodConf
from ..registry import Registry
from .base import Method

METHODS: Registry[type[Method]] = Registry("method", __name__)


def register(name: str, schema: type[MethodConf]) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: `name` is the method's config name and `schema` its keys (a dataclass
    extending `MethodConf`, stored as `schema/method/<name>` for `conf/method/<name>.yaml`)."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name, schema)(cls)

    return add


def check_method(name: str) -> None:
    METHODS.check(name)


def build_method(cfg: DictConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)


__all__ = ["METHODS", "Method", "build_method", "check_method", "register"]
