"""``cast``: floating tensors to another floating dtype, ties kept (a tied source is cast
once and its aliases follow it)."""

from __future__ import annotations

from collections.abc import Sequence

from .. import dtypes
from ..errors import Problem
from ..expressions import ComputedStored
from ..model import Checkpoint, Derived, Stored
from ..selectors import select_all
from ..transforms import Cast, Transform
from .ops import Op, derive, refuse


def _chosen_names(ckpt: Checkpoint, only: Sequence[str], exclude: Sequence[str]) -> set[str]:
    """The names ``only`` selects (every name when empty) less those ``exclude`` selects,
    by the one selector rule; a selector that selects nothing is an ``UnknownNameError``."""
    names = ckpt.names()
    chosen = set(select_all(names, only, path=ckpt.path)) if only else set(names)
    if exclude:
        chosen -= set(select_all(names, exclude, path=ckpt.path))
    return chosen


def cast(
    ckpt: Checkpoint,
    dtype: str,
    *,
    only: Sequence[str] = (),
    exclude: Sequence[str] = (),
    device="cpu",
) -> Checkpoint:
    """Cast the floating tensors (never integers or bool) to the floating ``dtype``.

    ``only`` / ``exclude`` choose names by the one selector rule (exact name, module
    prefix, glob; :mod:`wsurgery.selectors`); one that selects nothing is an
    ``UnknownNameError`` with close matches. A tie group (a stored
    tensor and its aliases) is cast as a whole; a group whose names the globs split
    (the source chosen and an alias not, or the other way round) is refused.
    """
    problems: list[Problem | str] = []
    entry = dtypes.lookup(str(dtype))
    if entry is None or entry.kind != "float":
        valid = ", ".join(d for d, e in dtypes.BY_NAME.items() if e.kind == "float")
        refuse([Problem(f"cast: {dtype!r} is not a floating dtype; cast takes one of {valid}")])
    assert entry is not None  # refused above otherwise
    target = entry.name
    step = Transform((Cast(target),))
    stored: dict[str, Stored] = dict(ckpt.stored)
    ops: list[Op] = []
    picked = _chosen_names(ckpt, only, exclude)
    for name, s in ckpt.stored.items():
        if dtypes.BY_NAME[s.dtype].kind != "float":
            continue
        chosen = name in picked
        split = [a for a, d in ckpt.aliases.items() if d.source == name and (a in picked) != chosen]
        if split:
            problems.append(
                Problem(
                    f"cast: {name} and its alias{'es' if len(split) > 1 else ''} {', '.join(split)} are tied, "
                    "but the names chosen to cast split them; untie first or choose the whole group",
                    use="untie",
                    names=(name, *split),
                )
            )
            continue
        if chosen and s.dtype != target:
            computed = ComputedStored(name, s, step, device=device)
            stored[name] = computed
            ops.append(Op("cast", name, name, computed.value, replaces=True, note=f"was {s.dtype}"))
    refuse(problems)
    aliases = {
        n: (a if stored[a.source] is a.base else Derived.of(stored[a.source], a.transform))
        for n, a in ckpt.aliases.items()
    }
    return derive(ckpt, stored, aliases, ops)
