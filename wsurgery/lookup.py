"""Looking one name up in a checkpoint: its entry, its value, its shape and dtype, and
the error for a name it does not hold.

Functions over the immutable :class:`~wsurgery.model.Checkpoint` rather than methods of
it, so the model needs neither the transforms nor the name selector (both sit above it),
and an unknown name gets the selector's one did-you-mean rule.

Example:
    >>> value(ckpt, "projection.weight").source       # doctest: +SKIP
    'embedding.weight'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UnknownNameError
from .model import Checkpoint, Derived, Stored
from .selectors import unknown as _unknown
from .transforms import IDENTITY

if TYPE_CHECKING:
    from .transforms import Transform


def unknown(ckpt: Checkpoint, name: str) -> UnknownNameError:
    """The error for a name ``ckpt`` does not hold, with close matches."""
    return _unknown(ckpt.names(), name, path=ckpt.path)


def entry(ckpt: Checkpoint, name: str) -> Stored | Derived:
    """The stored tensor or the alias under ``name``.

    Raises:
        UnknownNameError: when ``ckpt`` holds no such name (with close matches).
    """
    found = ckpt.stored.get(name)
    if found is not None:
        return found
    alias = ckpt.aliases.get(name)
    if alias is not None:
        return alias
    raise unknown(ckpt, name)


def value(ckpt: Checkpoint, name: str, extra: Transform | None = None) -> Derived:
    """``extra(name)`` as a :class:`Derived` over a stored tensor (aliases followed).

    Raises:
        UnknownNameError: for a name ``ckpt`` does not hold.
        TransformError: when ``extra`` does not fit the value.
    """
    e = entry(ckpt, name)
    d = e if isinstance(e, Derived) else Derived.of(e, IDENTITY)
    return d if extra is None else d.then(extra)


def shape_dtype(ckpt: Checkpoint, name: str) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype)`` of ``name``, read from the header: no tensor data."""
    e = entry(ckpt, name)
    return e.shape, e.dtype
