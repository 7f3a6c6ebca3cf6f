"""One explicit registry per extension point: duplicates rejected, typos answered.

Built-ins register in code; third-party packages register through a Python
entry point group (``medfed.strategies``, ``medfed.tasks``), so a researcher's
one-file plugin needs no fork of medfed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from medfed.core.errors import MedfedError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Map names to factories for one extension point.

    Parameters
    ----------
    kind : str
        What is registered ("strategy", "task"), used in messages.
    plural : str
        The plural, which is also the CLI command that lists them.
    entry_point_group : str
        Python entry point group scanned lazily for third-party plugins.
    """

    def __init__(self, kind: str, *, plural: str, entry_point_group: str) -> None:
        self.kind = kind
        self.plural = plural
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._plugins_loaded = False

    def register(self, name: str, item: T, *, origin: str = "built-in") -> T:
        """Register ``item`` under ``name``; a second registration of a name is an error."""
        if not name or name != name.strip() or " " in name:
            raise MedfedError(
                f"Invalid {self.kind} name {name!r}.",
                expected="a non-empty name without spaces, e.g. 'my-fedavg'",
            )
        if name in self._items:
            raise MedfedError(
                f"The {self.kind} name {name!r} is registered twice.",
                where=f"first by {self._origins[name]}, again by {origin}",
                fix=f"rename one of them; names of the {self.kind} registry must be unique",
            )
        self._items[name] = item
        self._origins[name] = origin
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers the decorated object under ``name``."""

        def wrap(item: T) -> T:
            return self.register(name, item)

        return wrap

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            try:
                item = ep.load()
            except Exception as exc:  # a broken plugin must not hide the built-ins
                raise MedfedError(
                    f"The {self.kind} plugin {ep.name!r} failed to import: {exc}",
                    where=f"entry point {ep.value} in group {self.entry_point_group}",
                    fix="fix or uninstall the package that provides it",
                ) from exc
            self.register(ep.name, item, origin=f"entry point {ep.value}")

    def get(self, name: str) -> T:
        """Return the item registered as ``name``, or fail with 'did you mean'."""
        self._load_plugins()
        if name in self._items:
            return self._items[name]
        close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownNameError(
            f"Unknown {self.kind} {name!r}.",
            expected=f"one of: {', '.join(sorted(self._items))}",
            fix=f"{hint}`medfed {self.plural}` lists them",
        )

    def origin(self, name: str) -> str:
        """Return where ``name`` was registered from (built-in or an entry point)."""
        self.get(name)
        return self._origins[name]

    def names(self) -> list[str]:
        """Return all registered names, sorted."""
        self._load_plugins()
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._items
