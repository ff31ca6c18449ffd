"""The one name selector (DESIGN.md "Selecting names").

A SELECTOR is, in this order of preference:

1. an exact tensor name: it selects that name;
2. a module prefix (``encoder.layers.0``): it selects every name under it
   (``encoder.layers.0.*``);
3. a glob (``fnmatch.fnmatchcase``; ``*`` crosses dots): every name it matches.

A selector that selects nothing is an unknown name (:class:`UnknownNameError`, carrying
close matches). Every verb, filter and recipe step that takes names uses this module, so
a typo means the same thing everywhere.

Example:
    >>> select(["a.w", "a.b", "c.w"], "a")
    ['a.w', 'a.b']
    >>> select(["a.w", "a.b", "c.w"], "*.w")
    ['a.w', 'c.w']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from .errors import UnknownNameError, close_matches

__all__ = ["GLOB_CHARS", "close_matches", "is_glob", "matches", "select", "select_all", "unknown", "unmatched"]

GLOB_CHARS = "*?["


def is_glob(selector: str) -> bool:
    """Whether ``selector`` holds a glob character (``*``, ``?`` or ``[``)."""
    return any(c in selector for c in GLOB_CHARS)


def matches(names: Sequence[str], selector: str, *, known: frozenset[str] | set[str] | None = None) -> list[str]:
    """The names ``selector`` selects, in the order of ``names``; empty when none.

    Args:
        names: every name of the checkpoint, in its order.
        selector: an exact name, a module prefix or a glob.
        known: ``set(names)`` when the caller already has it (saves building it again).
    """
    known = known if known is not None else set(names)
    if selector in known:
        return [selector]
    prefix = selector.rstrip(".") + "."
    if selector and prefix != ".":
        under = [n for n in names if n.startswith(prefix)]
        if under:
            return under
    if is_glob(selector):
        return [n for n in names if fnmatch.fnmatchcase(n, selector)]
    return []


def unknown(names: Iterable[str], selector: str, *, path: str | None = None) -> UnknownNameError:
    """The error for a selector that selects nothing, with close matches."""
    what = "tensor, module prefix or glob" if is_glob(selector) else "tensor or module"
    return UnknownNameError(
        selector,
        path=path,
        candidates=close_matches(names, selector),
        what=what,
        message=None if not is_glob(selector) else f"{selector!r} matches no tensor name"
        + (f" in {path}" if path else ""),
    )


def select(names: Sequence[str], selector: str, *, path: str | None = None) -> list[str]:
    """The names ``selector`` selects, in the order of ``names``.

    Raises:
        UnknownNameError: when it selects nothing (with close matches).
    """
    found = matches(names, selector)
    if not found:
        raise unknown(names, selector, path=path)
    return found


def select_all(names: Sequence[str], selectors: Iterable[str], *, path: str | None = None) -> list[str]:
    """Every name any of ``selectors`` selects, once each, in the order of ``names``.

    Raises:
        UnknownNameError: for the first selector that selects nothing.
    """
    known = set(names)
    chosen: set[str] = set()
    for selector in selectors:
        found = matches(names, selector, known=known)
        if not found:
            raise unknown(names, selector, path=path)
        chosen.update(found)
    return [n for n in names if n in chosen]


def unmatched(names: Sequence[str], selectors: Iterable[str]) -> list[str]:
    """The selectors that select nothing (for callers that report every problem at once)."""
    known = set(names)
    return [s for s in selectors if not matches(names, s, known=known)]
