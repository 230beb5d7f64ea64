"""Plug-ins by name. A method, a schedule, a quantizer or a sparsifier registers once, where it is
written: its name, and its config schema, which the same call stores in Hydra's ConfigStore as
`schema/<group>/<name>` (what the group's YAML file extends). Each registry finds its plug-ins by
importing every module of its package, so adding one needs no import line anywhere else."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from hydra.core.config_store import ConfigStore

from .errors import ShrinkError

T = TypeVar("T")


class Registry(Generic[T]):
    """The plug-ins of one config group (`method`, `schedule`, `quant`, `sparsity`), by name.

    `builtin` names choices that are no plug-in (a step's `none`): they are valid and listed, but
    `get` refuses them."""

    def __init__(self, group: str, package: str, builtin: Iterable[str] = ()) -> None:
        self.group, self.package = group, package
        self.builtin = tuple(builtin)
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, schema: type | None = None) -> Callable[[T], T]:
        """Decorator: register the plug-in under `name`, its schema (a dataclass) beside it."""

        def add(plugin: T) -> T:
            known = self._entries.get(name)
            if known is not None and known is not plugin:
                raise ValueError(f"{self.group} {name!r} is registered twice ({known!r}, {plugin!r})")
            self._entries[name] = plugin
            if schema is not None:
                self.store(name, schema)
            return plugin

        return add

    def load(self) -> None:
        """Import every module of the package once, so that each plug-in has registered itself."""
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for module in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
            importlib.import_module(module.name)

    def names(self) -> list[str]:
        self.load()
        return [*self.builtin, *sorted(self._entries)]

    def check(self, name: str) -> None:
        """An unknown name fails with the valid ones."""
        if name not in self.names():
            raise ShrinkError(f"unknown {self.group} {name!r}; valid: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        self.check(name)
        if name in self.builtin:
            raise KeyError(f"{self.group}={name} is no plug-in")
        return self._entries[name]

    __getitem__ = get

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return sorted(self._entries.items())

    def store(self, name: str, schema: type) -> None:
        """Store a schema that several plug-ins share (a step's keys) as `schema/<group>/<name>`."""
        ConfigStore.instance().store(group=f"schema/{self.group}", name=name, node=schema)
