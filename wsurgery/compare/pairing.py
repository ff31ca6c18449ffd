"""Pairing two checkpoints name by name: tie relations compared as relations, and the
jobs (value pairs) that give each name its statistics (``docs/compare.md``, "Ties are
compared as relations")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import lookup
from ..model import Checkpoint, Derived, natural_key
from ..transforms import IDENTITY, Permute, Reshape, Transform, Transpose
from .kernel import (
    TensorStats,
)

# ----------------------------------------------------------------------------- ties


def _info(ckpt: Checkpoint, name: str) -> dict[str, Any]:
    e = lookup.entry(ckpt, name)
    return {
        "dtype": e.dtype,
        "shape": list(e.shape),
        "alias_of": e.record() if isinstance(e, Derived) else None,
    }


def _record(ckpt: Checkpoint, name: str) -> tuple[str, tuple[str, ...]] | None:
    a = ckpt.aliases.get(name)
    return None if a is None else (a.source, tuple(a.specs))


def _axis_perm(t: Transform, rank: int) -> tuple[int, ...] | None:
    """The axis permutation ``p`` with ``t(x) == x.permute(p)``, or None if ``t`` is not one."""
    perm = list(range(rank))
    for step in t.steps:
        if isinstance(step, Transpose):
            if step.dims is None:
                if rank != 2:
                    return None
                d0, d1 = 0, 1
            else:
                d0, d1 = (d % rank for d in step.dims) if rank else (0, 0)
            p = list(range(rank))
            p[d0], p[d1] = p[d1], p[d0]
        elif isinstance(step, Permute):
            if len(step.dims) != rank:
                return None
            p = [d % rank for d in step.dims]
        else:
            return None
        perm = [perm[p[i]] for i in range(rank)]
    return tuple(perm)


class _Ties:
    """Tie groups of one checkpoint: stored source -> {member: transform from the source}."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.groups: dict[str, dict[str, Transform]] = {}
        for name, a in ckpt.aliases.items():
            self.groups.setdefault(a.source, {a.source: IDENTITY})[name] = a.transform

    def group(self, name: str) -> dict[str, Transform] | None:
        a = self.ckpt.aliases.get(name)
        return self.groups.get(a.source if a is not None else name)

    def relation(self, name: str) -> tuple | None:
        """The tie group of ``name`` as ``(names, ((member, axis permutation relative to the
        group's first name), ...))``: the same whatever member is stored. None when ``name``
        is untied or a transform in its group is no pure axis permutation."""
        g = self.group(name)
        if g is None:
            return None
        a = self.ckpt.aliases.get(name)
        rank = len(self.ckpt.stored[a.source if a is not None else name].shape)
        perms = {m: _axis_perm(t, rank) for m, t in g.items()}
        known = {m: p for m, p in perms.items() if p is not None}
        if len(known) != len(perms):
            return None
        first = min(g, key=natural_key)
        inv = [0] * rank
        for i, d in enumerate(known[first]):
            inv[d] = i
        rel = {m: tuple(inv[p[i]] for i in range(rank)) for m, p in known.items()}
        return (frozenset(g), tuple(sorted(rel.items())))


def _same_relation(ta: _Ties, tb: _Ties, name: str) -> bool:
    if _record(ta.ckpt, name) == _record(tb.ckpt, name):
        return True
    ra, rb = ta.relation(name), tb.relation(name)
    return ra is not None and ra == rb


def _rearranges(t: Transform) -> bool:
    """True when ``t`` maps elements one to one (no slice): statistics are unchanged by it."""
    return all(isinstance(s, (Transpose, Permute, Reshape)) for s in t.steps)


# ------------------------------------------------------------------------------ diff


@dataclass
class _Job:
    """Values to compare for one name (or a hidden alias source)."""

    key: str
    va: Derived
    vb: Derived
    stats: TensorStats | None = None


@dataclass
class _Entry:
    name: str
    reason: str | None  # shape / dtype / alias decided without data; None = by value
    job: str | None = None  # key of the job whose stats this name takes


def _plan_diff(
    A: Checkpoint, B: Checkpoint, common: list[str], ignore_ties: bool = False
) -> tuple[list[_Entry], dict[str, _Job]]:
    ta, tb = _Ties(A), _Ties(B)
    entries: list[_Entry] = []
    jobs: dict[str, _Job] = {}

    def stored_job(name: str) -> str | None:
        """The job comparing stored tensor ``name`` of both sides, if shapes agree."""
        key = "stored:" + name
        if key not in jobs:
            sa, sb = A.stored[name], B.stored[name]
            if sa.shape != sb.shape:
                return None
            jobs[key] = _Job(key, lookup.value(A, name), lookup.value(B, name))
        return key

    for name in common:
        ea, eb = lookup.entry(A, name), lookup.entry(B, name)
        if tuple(ea.shape) != tuple(eb.shape):
            entries.append(_Entry(name, "shape"))
            continue
        reason = None
        if ea.dtype != eb.dtype:
            reason = "dtype"
        elif not ignore_ties and not _same_relation(ta, tb, name):
            reason = "alias"
        ra, rb = _record(A, name), _record(B, name)
        key = None
        if ra is None and rb is None:
            key = stored_job(name)
        elif ra is not None and ra == rb and _rearranges(A.aliases[name].transform):
            key = stored_job(ra[0])  # the source's statistics are the alias's
        if key is None:
            key = "value:" + name
            jobs[key] = _Job(key, lookup.value(A, name), lookup.value(B, name))
        entries.append(_Entry(name, reason, key))
    return entries, jobs
