"""Methods and datasets by name: modules in the built-in packages register themselves with a
decorator, third-party packages through entry points (groups ``semibench.methods`` and
``semibench.datasets``). Nothing is listed by hand."""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, group: str):
        self.kind, self.package, self.group = kind, package, group
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ConfigError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj
        return decorator

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")
        for ep in entry_points(group=self.group):
            obj = ep.load()  # a module registers on import; a class/function is registered by name
            if ep.name not in self._items and not isinstance(obj, type(importlib)):
                self._items[ep.name] = obj

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._discover()
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]


METHODS: Registry = Registry("method", "semibench.methods", "semibench.methods")
DATASETS: Registry = Registry("dataset", "semibench.datasets", "semibench.datasets")
register_method = METHODS.register
register_dataset = DATASETS.register
