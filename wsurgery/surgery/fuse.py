"""Verbs that fuse and unfuse tensors: ``concat`` / ``split`` (q, k, v <-> qkv) and
``stack`` / ``unstack`` (per-layer names <-> one tensor with a layer axis, as Megatron
stores layers).

These verbs *move*: their sources are gone from the result (copy a source first to keep
it). A source that aliases still use, or a destination that is the source of aliases,
is refused: untie those first. The results are lazy entries, computed when written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .. import lookup
from ..errors import Problem, UsageError
from ..expressions import ComputedStored, Joined
from ..model import Checkpoint, Derived, Stored, natural_key
from ..show import shape_text
from ..transforms import Reshape, Slice, Transform
from .ops import NameBudget, Op, check_new_names, check_orphans, derive, refuse, select_under


def _dim(rank: int, dim: int, verb: str, problems: list, what: str = "", result: bool = False) -> int | None:
    """``dim`` in ``range(rank)`` (negative counts from the end), or None with a problem
    naming ``what`` and whether ``rank`` is the result's (stack adds an axis)."""
    if not -rank <= dim < max(rank, 1):
        whose = f"the result {what}" if result else what
        text = f"{verb}: dim {dim} is out of range for {whose} ({rank}-d; dims {-rank} .. {rank - 1})"
        problems.append(Problem(text, names=(what,) if what else ()))
        return None
    return dim % rank if rank else 0


def _move(
    ckpt: Checkpoint, sources: Sequence[str], made: Mapping[str, Stored], verb: str, problems: list, new: bool
) -> tuple[dict[str, Stored], dict[str, Derived], list[str]]:
    """Entries of the result: ``sources`` removed, ``made`` added; which names ``made``
    replaces. Aliases left without their source, or over a replaced tensor, are problems."""
    leaving = set(sources) | set(made)
    check_orphans(ckpt, [*sources, *made], verb, problems)
    if not new:
        check_new_names(ckpt, made, verb, problems)
    refuse(problems)
    stored = {n: s for n, s in ckpt.stored.items() if n not in leaving}
    stored.update(made)
    aliases = {n: a for n, a in ckpt.aliases.items() if n not in leaving}
    return stored, aliases, [n for n in made if n in ckpt]


def _made_names(
    ckpt: Checkpoint, verb: str, what: str, made: Sequence[str], about: Sequence[str], leaving: Sequence[str] = ()
) -> None:
    """Refuse ``made`` (names a verb would make, ``leaving`` gone) past the bounds of
    :class:`~.ops.NameBudget`."""
    budget = NameBudget(ckpt)
    fresh = [n for n in made if n not in ckpt]
    count = budget.held - len(leaving) + len(fresh)
    chars = budget.chars - sum(map(len, leaving)) + sum(map(len, fresh))
    budget.made(verb, what, count, chars, max(map(len, made), default=0), about)


def _values(ckpt: Checkpoint, names: Sequence[str]) -> list[Derived]:
    return [lookup.value(ckpt, n) for n in names]  # UnknownNameError for a name it does not hold


def _agree(parts: Sequence[Derived], names: Sequence[str], dim: int | None, verb: str, problems: list) -> bool:
    """Same dtype everywhere; same shape everywhere (but along ``dim``, when given)."""
    first = parts[0]
    ok = True
    for n, p in zip(names, parts, strict=True):
        if p.dtype != first.dtype:
            problems.append(
                Problem(f"{verb}: {n} is {p.dtype} but {names[0]} is {first.dtype}; cast first", suggest=())
            )
            ok = False
        other = [d for i, d in enumerate(p.shape) if i != dim] if dim is not None else list(p.shape)
        want = [d for i, d in enumerate(first.shape) if i != dim] if dim is not None else list(first.shape)
        if len(p.shape) != len(first.shape) or other != want:
            along = f" but along dim {dim}" if dim is not None else ""
            problems.append(
                Problem(
                    f"{verb}: {n} has shape {shape_text(p.shape)} and {names[0]} {shape_text(first.shape)}; "
                    f"they must agree{along}"
                )
            )
            ok = False
    return ok


def concat(ckpt: Checkpoint, srcs: Sequence[str], dst: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
    """``dst`` = the ``srcs`` concatenated along ``dim``; the sources are gone."""
    srcs = list(srcs)
    problems: list[Problem | str] = []
    if len(srcs) < 2:
        raise UsageError(f"concat takes at least two sources, got {len(srcs)}", param="src")
    _made_names(ckpt, "concat", f"{len(srcs)} tensors", [dst], [dst])
    parts = _values(ckpt, srcs)
    d = _dim(len(parts[0].shape), dim, "concat", problems, srcs[0])
    if d is not None:
        _agree(parts, srcs, d, "concat", problems)
    refuse(problems)
    assert d is not None  # refused above otherwise
    joined = Joined(dst, parts, d)
    stored, aliases, replaced = _move(ckpt, srcs, {dst: joined}, "concat", problems, new)
    op = Op("concat", ", ".join(srcs), dst, joined, replaces=dst in replaced)
    return derive(ckpt, stored, aliases, [op])


def split(
    ckpt: Checkpoint, src: str, dsts: Sequence[str], dim: int, sizes: Sequence[int], *, new: bool = False
) -> Checkpoint:
    """``dsts`` = consecutive pieces of ``src`` along ``dim`` of the given ``sizes``; ``src``
    is gone (unless it is one of the pieces)."""
    dsts, sizes = list(dsts), [int(s) for s in sizes]
    problems: list[Problem | str] = []
    value = lookup.value(ckpt, src)
    if len(sizes) != len(dsts):
        problems.append(Problem(f"split: {len(dsts)} destinations but {len(sizes)} sizes"))
    if any(s < 0 for s in sizes):
        problems.append(Problem(f"split: sizes must be >= 0, got {sizes}"))
    d = _dim(len(value.shape), dim, "split", problems, src)
    if d is not None and not problems and sum(sizes) != value.shape[d]:
        problems.append(
            Problem(
                f"split: sizes {sizes} add up to {sum(sizes)} but dim {d} of {src} {shape_text(value.shape)} "
                f"is {value.shape[d]}"
            )
        )
    if len(set(dsts)) != len(dsts):
        problems.append(Problem(f"split: a destination is named twice in {dsts}"))
    refuse(problems)
    _made_names(ckpt, "split", f"{src} {shape_text(value.shape)} ({len(dsts):,} pieces)", dsts, [src], [src])
    assert d is not None  # refused above otherwise
    made: dict[str, ComputedStored] = {}
    offset = 0
    for name, size in zip(dsts, sizes, strict=True):
        piece = Transform((Slice(d, offset, offset + size),))
        made[name] = ComputedStored(name, value.base, value.transform.then(piece))
        offset += size
    stored, aliases, replaced = _move(ckpt, [src], made, "split", problems, new)
    ops = [Op("split", src, n, made[n].value, replaces=n in replaced) for n in dsts]
    return derive(ckpt, stored, aliases, ops)


def _template(template: str, verb: str) -> tuple[str, str]:
    if template.count("{i}") != 1:
        raise UsageError(f"{verb}: the template {template!r} must hold {{i}} exactly once", param="template")
    before, after = template.split("{i}")
    return before, after


def _short_index(digits: str) -> str:
    return digits if len(digits) <= 24 else f"{digits[:10]}...{digits[-6:]} ({len(digits):,} digits)"


def _indexed(ckpt: Checkpoint, template: str, verb: str, problems: list) -> dict[str, list[str]]:
    """``{suffix: [name for i = 0, 1, ...]}`` for the names the template matches: the
    template names tensors (suffix ``""``), or module prefixes (every tensor under them).

    Indices are bounded by the names present, never by the largest index: the ``n``
    names of a group must hold exactly ``i = 0 .. n-1``; any other index (a gap, a
    5,000-digit number) is a problem naming it, found before anything is allocated.
    """
    before, after = _template(template, verb)
    whole = re.compile(re.escape(before) + r"(0|[1-9][0-9]*)" + re.escape(after) + r"(\..+)?")
    found: dict[str, dict[str, str]] = {}
    for name in ckpt.names():
        m = whole.fullmatch(name)
        if m:
            found.setdefault((m.group(2) or "").lstrip("."), {})[m.group(1)] = name
    exact = found.pop("", None)
    groups = {"": exact} if exact else found
    if not groups:
        problems.append(Problem(f"{verb}: the template {template!r} matches no tensor name or module prefix"))
        return {}
    out: dict[str, list[str]] = {}
    for suffix, by_digits in sorted(groups.items(), key=lambda kv: natural_key(kv[0])):
        n = len(by_digits)
        where = f" for .{suffix}" if suffix else ""
        beyond = sorted((d for d in by_digits if len(d) > len(str(n - 1)) or int(d) >= n), key=lambda d: (len(d), d))
        if beyond:
            missing = [i for i in range(n) if str(i) not in by_digits]
            problems.append(
                Problem(
                    f"{verb}: {template!r} has no i = {', '.join(map(str, missing[:10]))}{where} but has "
                    f"i = {_short_index(beyond[0])} ({n} names; the indices must run 0 .. {n - 1} without gaps)",
                    names=(by_digits[beyond[0]],),
                )
            )
            continue
        out[suffix] = [by_digits[str(i)] for i in range(n)]
    counts = {len(v) for v in out.values()}
    if len(counts) > 1:
        problems.append(
            Problem(f"{verb}: the tensors under {template!r} do not come in equal numbers: {sorted(counts)}")
        )
    return out


def _join(base: str, suffix: str) -> str:
    return f"{base}.{suffix}" if suffix else base


def stack(ckpt: Checkpoint, template: str, dst: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
    """``dst`` = the tensors ``template`` names (``'layers.{i}.fc1.weight'``, i = 0, 1, ...)
    stacked on a new axis ``dim``. A template of module prefixes (``'layers.{i}'``) stacks
    every tensor under them into ``dst.<suffix>``. The sources are gone."""
    problems: list[Problem | str] = []
    groups = _indexed(ckpt, template, "stack", problems)
    _made_names(ckpt, "stack", repr(template), [_join(dst, suffix) for suffix in groups], [dst])
    made: dict[str, Stored] = {}
    sources: list[str] = []
    for suffix, names in groups.items():
        parts = _values(ckpt, names)
        made_name = _join(dst, suffix)
        d = _dim(len(parts[0].shape) + 1, dim, "stack", problems, made_name, result=True)
        if d is not None and _agree(parts, names, None, "stack", problems):
            made[_join(dst, suffix)] = Joined(_join(dst, suffix), parts, d, new_axis=True)
        sources += names
    refuse(problems)
    stored, aliases, replaced = _move(ckpt, sources, made, "stack", problems, new)
    ops = [Op("stack", template, n, j, replaces=n in replaced) for n, j in made.items()]
    return derive(ckpt, stored, aliases, ops)


def _digits_below(n: int) -> int:
    """The digits of ``0, 1, ..., n - 1`` written out, in all (without building them)."""
    total, width, low = 0, 1, 0
    while low < n:
        high = min(n, 10**width)
        total += (high - low) * width
        low, width = high, width + 1
    return total


def unstack(ckpt: Checkpoint, src: str, template: str, dim: int = 0, *, new: bool = False) -> Checkpoint:
    """The reverse of :func:`stack`: ``template`` with i = 0 .. n-1 names the slices of
    ``src`` along ``dim`` (that axis removed). A module prefix ``src`` unstacks every
    tensor under it into ``<template>.<suffix>``. ``src`` is gone.

    The slices are counted before any is made: a shape is only a claim (a ``(10**9, 0)``
    tensor holds no byte), so names past the bounds of :class:`~.ops.NameBudget` are
    refused, naming the tensor and the count.
    """
    before, after = _template(template, "unstack")
    problems: list[Problem | str] = []
    found: list[tuple[str, str, Derived, int]] = []
    count = chars = longest = 0
    for name, suffix in select_under(ckpt, src):  # UnknownNameError when it selects nothing
        value = lookup.value(ckpt, name)
        d = _dim(len(value.shape), dim, "unstack", problems, name)
        if d is None:
            continue
        n = value.shape[d]
        fixed = len(before) + len(after) + (len(suffix) + 1 if suffix else 0)
        count, chars = count + n, chars + n * fixed + _digits_below(n)
        longest = max(longest, fixed + len(str(max(n - 1, 0))))
        found.append((name, suffix, value, d))
    refuse(problems)
    n_made = count
    what = f"{found[0][0]} {shape_text(found[0][2].shape)}" if len(found) == 1 else f"{src} ({len(found)} tensors)"
    budget = NameBudget(ckpt)
    count, chars = budget.held - len(found) + count, budget.chars - sum(len(f[0]) for f in found) + chars
    budget.made("unstack", f"{what} along dim {dim} ({n_made:,} slices)", count, chars, longest, [f[0] for f in found])
    made: dict[str, ComputedStored] = {}
    for _, suffix, value, d in found:
        rest = value.shape[:d] + value.shape[d + 1 :]
        for i in range(value.shape[d]):
            out = _join(f"{before}{i}{after}", suffix)
            piece = Transform((Slice(d, i, i + 1), Reshape(rest)))
            made[out] = ComputedStored(out, value.base, value.transform.then(piece))
    stored, aliases, replaced = _move(ckpt, [f[0] for f in found], made, "unstack", problems, new)
    ops = [Op("unstack", src, n, s.value, replaces=n in replaced) for n, s in made.items()]
    return derive(ckpt, stored, aliases, ops)
