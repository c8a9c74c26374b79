"""A named registry filled by the modules that implement its entries (methods, optimizers).

Each implementing module calls ``REGISTRY.register(entry)`` when imported; the registry knows only the list of
those modules and imports them on first lookup, so a new entry is its own file plus one module name. A bottom
layer: imports nothing from leantrain.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """``kind`` names the entries in errors ("method", "optimizer"); ``modules`` register them on import."""

    def __init__(self, kind: str, modules: Sequence[str] | Callable[[], Sequence[str]]) -> None:
        self.kind, self._modules = kind, modules
        self._entries: dict[str, T] = {}
        self._loaded = False

    @property
    def modules(self) -> tuple[str, ...]:
        """The registering modules (a callable discovers them, e.g. every file of a package)."""
        return tuple(self._modules() if callable(self._modules) else self._modules)

    def register(self, entry: T) -> T:
        """Add ``entry`` under its name; a second object under the same name is a bug, not an override."""
        if entry.name in self._entries and self._entries[entry.name] is not entry:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def all(self) -> dict[str, T]:
        """Every entry, by name (imports the registering modules on first use only: lookups sit on the path of
        every TrainConfig validation)."""
        if not self._loaded:
            for module in self.modules:
                importlib.import_module(module)
            self._loaded = True
        return dict(self._entries)

    def names(self) -> list[str]:
        return sorted(self.all())

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name gets one line listing the valid ones."""
        entries = self.all()
        if name not in entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(entries))}")
        return entries[name]
