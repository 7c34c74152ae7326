"""The routes of one SNI port (SPEC §2.8): exact names, single-label wildcards, one fallback.

Pure data, no sockets: ``route(server_name)`` answers exact > wildcard >
fallback. A wildcard ``*.example.com`` covers exactly one more label, so the only
wildcard that can match ``a.b.example.com`` is ``*.b.example.com`` — the longest
suffix is the one and only candidate, found with one dict lookup.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")

EXACT = "exact"
WILDCARD = "wildcard"
FALLBACK = "fallback"
NONE = "none"
RESULTS = (EXACT, WILDCARD, FALLBACK)  # the route results counted per rule


def normalize_name(server_name: str | None) -> str:
    """Lowercase, without a trailing dot; "" for no name."""
    name = (server_name or "").lower()
    return name[:-1] if name.endswith(".") else name


class SniRouter(Generic[T]):
    """Patterns -> routes of one listener, and its fallback."""

    __slots__ = ("exact", "wildcard", "fallback")

    def __init__(self) -> None:
        self.exact: dict[str, T] = {}
        self.wildcard: dict[str, T] = {}  # "example.com" holds the route of "*.example.com"
        self.fallback: T | None = None

    @staticmethod
    def _slot(pattern: str) -> tuple[str, bool]:
        pattern = normalize_name(pattern)
        if pattern.startswith("*."):
            return pattern[2:], True
        return pattern, False

    def holder(self, pattern: str | None) -> T | None:
        """Who holds ``pattern`` now (None: the fallback slot)."""
        if pattern is None:
            return self.fallback
        key, wild = self._slot(pattern)
        return (self.wildcard if wild else self.exact).get(key)

    def add(self, pattern: str | None, route: T) -> bool:
        """Take ``pattern`` (None: the fallback) for ``route``; False when someone else holds it."""
        held = self.holder(pattern)
        if held is not None and held is not route:
            return False
        if pattern is None:
            self.fallback = route
        else:
            key, wild = self._slot(pattern)
            (self.wildcard if wild else self.exact)[key] = route
        return True

    def remove(self, pattern: str | None, route: T) -> None:
        """Give ``pattern`` up, if ``route`` holds it."""
        if self.holder(pattern) is not route:
            return
        if pattern is None:
            self.fallback = None
        else:
            key, wild = self._slot(pattern)
            del (self.wildcard if wild else self.exact)[key]

    @property
    def sni_routes(self) -> int:
        """Routes chosen by name (the fallback is not one)."""
        return len(self.exact) + len(self.wildcard)

    def __bool__(self) -> bool:
        return bool(self.sni_routes or self.fallback is not None)

    def route(self, server_name: str | None) -> tuple[T | None, str]:
        """``(route, result)``: result is exact, wildcard, fallback or none (nothing to send it to)."""
        name = normalize_name(server_name)
        if name:
            hit = self.exact.get(name)
            if hit is not None:
                return hit, EXACT
            _, dot, parent = name.partition(".")
            if dot:
                hit = self.wildcard.get(parent)
                if hit is not None:
                    return hit, WILDCARD
        if self.fallback is not None:
            return self.fallback, FALLBACK
        return None, NONE
