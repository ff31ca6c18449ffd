"""Verbs over names: ``rename`` (a regex over every name), ``drop`` and ``keep`` (by name,
module prefix or glob). Ties follow: a renamed source renames its aliases' source, and a
source cannot be dropped while an alias that stays uses it."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import Problem
from ..model import Checkpoint, Derived, Stored, natural_key
from .ops import Op, check_orphans, derive, refuse, select


def rename(ckpt: Checkpoint, pattern: str, to: str) -> Checkpoint:
    """Every name ``n`` becomes ``re.sub(pattern, to, n)`` (``\\1`` refers to groups).

    Refused (every problem at once): a pattern that does not compile or matches no name,
    a replacement that fails, an empty result, two names onto one.
    """
    problems: list[Problem | str] = []
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        refuse([Problem(f"rename: pattern {pattern!r} is not a valid regular expression: {exc}")])
    new_names: dict[str, str] = {}
    matched = False
    for name in ckpt.names():
        try:
            new, count = regex.subn(to, name)
        except (re.error, IndexError) as exc:
            refuse([Problem(f"rename: replacement {to!r} fails on {name!r}: {exc}")])
        matched = matched or count > 0
        if not new:
            problems.append(Problem(f"rename: {name!r} would become an empty name", names=(name,)))
        new_names[name] = new
    if not matched:
        problems.append(Problem(f"rename: pattern {pattern!r} matches no name"))
    onto: dict[str, list[str]] = {}
    for old, new in new_names.items():
        onto.setdefault(new, []).append(old)
    for new, olds in onto.items():
        if len(olds) > 1:
            problems.append(Problem(f"rename: {', '.join(olds)} would all become {new!r}", names=tuple(olds)))
    refuse(problems)

    stored: dict[str, Stored] = {}
    for name, s in ckpt.stored.items():
        new = new_names[name]
        stored[new] = s if new == name else s.renamed(new)
    aliases: dict[str, Derived] = {}
    for name, a in ckpt.aliases.items():
        base = stored[new_names[a.source]]
        aliases[new_names[name]] = a if base is a.base else Derived(base, a.transform, a.shape, a.dtype)
    ops = [
        Op("rename", old, new, aliases.get(new) or Derived.of(stored[new]), replaces=False)
        for old, new in new_names.items()
        if old != new
    ]
    ordered = {n: stored[n] for n in sorted(stored, key=natural_key)}
    return derive(ckpt, ordered, aliases, ops)


def _without(ckpt: Checkpoint, gone: Sequence[str], verb: str, problems: list) -> Checkpoint:
    """``ckpt`` without the names ``gone``; dropping a source that a kept alias uses is a problem."""
    gone_set = set(gone)
    check_orphans(ckpt, gone, verb, problems)
    refuse(problems)
    stored = {n: s for n, s in ckpt.stored.items() if n not in gone_set}
    aliases = {n: a for n, a in ckpt.aliases.items() if n not in gone_set}
    return derive(ckpt, stored, aliases, [Op("drop", n, n, None) for n in gone])


def drop(ckpt: Checkpoint, names: Sequence[str]) -> Checkpoint:
    """Remove the tensors ``names`` select (a name, a module prefix or a glob each)."""
    problems: list[Problem | str] = []
    gone = select(ckpt, names, "drop", problems)
    return _without(ckpt, gone, "drop", problems)


def keep(ckpt: Checkpoint, names: Sequence[str]) -> Checkpoint:
    """Keep only the tensors ``names`` select (a name, a module prefix or a glob each)."""
    problems: list[Problem | str] = []
    kept = set(select(ckpt, names, "keep", problems))
    return _without(ckpt, [n for n in ckpt.names() if n not in kept], "keep", problems)
