"""Verbs over names: ``rename`` (a regex over every name, RE2), ``drop`` and ``keep`` (by name,
module prefix or glob). Ties follow: a renamed source renames its aliases' source, and a
source cannot be dropped while an alias that stays uses it."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import Problem, UnknownNameError
from ..model import Checkpoint, Derived, Stored, natural_key
from ..selectors import close_matches
from ..transforms import IDENTITY
from .ops import Op, check_orphans, derive, refuse, select_entries
from .patterns import NameTooLong, PatternError, rename_all, shown


def rename(ckpt: Checkpoint, pattern: str, to: str) -> Checkpoint:
    """Every name ``n`` becomes ``re.sub(pattern, to, n)`` (``\\1`` refers to groups), the
    pattern matched by RE2 in linear time (see :mod:`.patterns`).

    Refused (every problem at once): a pattern that does not compile or needs
    backtracking, a replacement that fails, a pattern that matches no name (an
    ``UnknownNameError``), an empty result, two names onto one, a name longer than
    ``limits.MAX_NAME_LENGTH`` or names past ``limits.MAX_NAMES_BYTES`` in all.
    """
    problems: list[Problem | str] = []
    try:
        new_names, matched = rename_all(ckpt.names(), pattern, to)
    except (PatternError, NameTooLong) as exc:
        refuse([Problem(f"rename: {exc}")])
    if not matched:
        raise UnknownNameError(
            pattern,
            path=ckpt.path,
            message=f"the rename pattern {shown(pattern)} matches no name" + (f" in {ckpt.path}" if ckpt.path else ""),
            candidates=close_matches(ckpt.names(), pattern),
        )
    for name, new in new_names.items():
        if not new:
            problems.append(Problem(f"rename: {name!r} would become an empty name", names=(name,)))
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
        Op("rename", old, new, aliases.get(new) or Derived.of(stored[new], IDENTITY), replaces=False)
        for old, new in new_names.items()
        if old != new
    ]
    ordered = {n: stored[n] for n in sorted(stored, key=natural_key)}
    return derive(ckpt, ordered, aliases, ops)


def _without(ckpt: Checkpoint, gone: Sequence[str], verb: str, skipped: list[str]) -> Checkpoint:
    """``ckpt`` without the names ``gone`` (its non-tensor entries: ``skipped``); dropping
    a source that a kept alias uses is refused."""
    problems: list[Problem | str] = []
    gone_set = set(gone)
    check_orphans(ckpt, gone, verb, problems)
    refuse(problems)
    stored = {n: s for n, s in ckpt.stored.items() if n not in gone_set}
    aliases = {n: a for n, a in ckpt.aliases.items() if n not in gone_set}
    return derive(ckpt, stored, aliases, [Op("drop", n, n, None) for n in gone], skipped=skipped)


def drop(ckpt: Checkpoint, names: Sequence[str]) -> Checkpoint:
    """Remove the tensors ``names`` select (a name, a module prefix or a glob each; see
    :mod:`wsurgery.selectors`), and the non-tensor entries they select, so they are no
    longer listed as left out.

    Raises:
        UnknownNameError: a selector that selects nothing (with close matches).
    """
    gone, left_out = select_entries(ckpt, names)
    return _without(ckpt, gone, "drop", [s for s in ckpt.skipped if s not in left_out])


def keep(ckpt: Checkpoint, names: Sequence[str]) -> Checkpoint:
    """Keep only the tensors (and non-tensor entries) ``names`` select (a name, a module
    prefix or a glob each; see :mod:`wsurgery.selectors`).

    Raises:
        UnknownNameError: a selector that selects nothing (with close matches).
    """
    kept, left_out = select_entries(ckpt, names)
    chosen = set(kept)
    gone = [n for n in ckpt.names() if n not in chosen]
    return _without(ckpt, gone, "keep", [s for s in ckpt.skipped if s in left_out])
