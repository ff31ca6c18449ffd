"""The reports of ``diff`` and ``check`` (``DiffReport``, ``CheckReport``) and their rows;
``to_dict()`` is the one source of their JSON (``wsurgery.diff/1``, ``wsurgery.check/1``)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..model import natural_key
from .criteria import Criteria
from .kernel import (
    TensorStats,
    json_float,
)
from .rollup import ModuleStats

REASONS = ("shape", "dtype", "alias", "value")  # most severe first
AUTO_MIN_CHANGED = 33  # the command line's default rollup: when more names than this changed


def unbounded(stats: TensorStats | None) -> bool:
    """Whether a pair's difference involves a non-finite value (``norm_diff`` infinite)."""
    return stats is not None and stats.norm_diff is not None and math.isinf(stats.norm_diff)


_STATS_KEYS = ("max_abs_diff", "max_rel_diff", "mismatched", "numel", "cosine", "rel_l2")


# --------------------------------------------------------------------------- reports


def _stats_dict(stats: TensorStats | None) -> dict[str, Any]:
    if stats is None:
        return dict.fromkeys(_STATS_KEYS)
    d = stats.to_dict()
    return {k: d[k] for k in _STATS_KEYS}


def _to_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class Change:
    """One name whose tensors differ. ``a`` / ``b``: ``{dtype, shape, alias_of}`` of each side."""

    name: str
    reason: str
    a: dict[str, Any]
    b: dict[str, Any]
    stats: TensorStats | None

    @property
    def mismatched_fraction(self) -> float:
        s = self.stats
        return s.mismatched / s.numel if s is not None and s.numel else 0.0

    @property
    def unbounded(self) -> bool:
        """Whether a mismatch involves a non-finite value (a NaN or an infinity that
        appeared, moved or changed sign): ``rel_l2`` and ``norm_diff`` are then infinite."""
        return unbounded(self.stats)

    def severity(self) -> tuple:
        """Sort key, most severe first: an unbounded difference (a NaN or infinity that
        appeared) before anything else, then reason, fraction mismatched, max |a - b|."""
        s = self.stats
        max_abs = s.max_abs_diff if s is not None and not math.isnan(s.max_abs_diff) else 0.0
        return (
            not self.unbounded,
            REASONS.index(self.reason),
            -self.mismatched_fraction,
            -max_abs,
            natural_key(self.name),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "a": self.a, "b": self.b, **_stats_dict(self.stats)}


@dataclass(frozen=True)
class DiffReport:
    """Result of :func:`diff`. ``equal`` iff no name is only on one side and none changed."""

    a: str
    b: str
    only_in_a: list[str]
    only_in_b: list[str]
    changed: list[Change]  # most severe first
    same: int
    atol: float = 0.0
    rtol: float = 0.0
    bytes_compared: int = 0
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    ignore_ties: bool = False
    depth: int | None = None  # of the module rollup
    modules: list[ModuleStats] | None = None  # None without a rollup
    skipped_a: list[str] = field(default_factory=list)  # entries of A that are not tensors, "name: what"
    skipped_b: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.changed)

    @property
    def criteria(self) -> Criteria:
        return Criteria(self.atol, self.rtol, self.max_rel_l2, self.min_cosine)

    def to_dict(self) -> dict[str, Any]:
        """The ``wsurgery.diff/1`` JSON object. Valid JSON: non-finite statistics are the
        strings ``"Infinity"``, ``"-Infinity"`` and ``"NaN"``, null is "no statistic"."""
        d = {
            "schema": "wsurgery.diff/1",
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_rel_l2": self.max_rel_l2,
            "min_cosine": self.min_cosine,
            "ignore_ties": self.ignore_ties,
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "changed": [c.to_dict() for c in self.changed],
            "same": self.same,
            "skipped": {"a": list(self.skipped_a), "b": list(self.skipped_b)},
        }
        if self.modules is not None:
            d["depth"] = self.depth
            d["modules"] = [m.to_dict() for m in self.modules]
        return d

    def to_json(self) -> str:
        """``to_dict()`` as one line of JSON text."""
        return _to_json(self.to_dict())

    def to_html(self) -> str:
        """A self-contained HTML page of this report (``wsurgery.compare.html``)."""
        from .html import render

        return render(self)

    def save_html(self, path: str | os.PathLike, *, sync: bool = True) -> None:
        """Write :meth:`to_html` to ``path`` atomically (an existing file is replaced)."""
        from .html import save

        save(self, path, sync=sync)


@dataclass(frozen=True)
class PairResult:
    """One ``transform(src)`` vs ``dst`` pair of :func:`check`."""

    src: str
    dst: str
    reason: str | None  # None when equal
    src_info: dict[str, Any]  # dtype and shape of transform(src)
    dst_info: dict[str, Any]
    stats: TensorStats | None

    @property
    def equal(self) -> bool:
        return self.reason is None

    def severity(self) -> tuple:
        return Change(self.dst, self.reason or "value", {}, {}, self.stats).severity()

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "equal": self.equal,
            "reason": self.reason,
            "src_tensor": self.src_info,
            "dst_tensor": self.dst_info,
            **_stats_dict(self.stats),
        }


def _aggregated(field: str, combine) -> property:
    """A ``CheckReport`` property: ``combine`` (sum or max) of one statistic over the pairs
    that have statistics, None when none has."""

    def get(self: CheckReport):
        s = self._with_stats()
        return combine(getattr(x, field) for x in s) if s else None

    return property(get, doc=f"{combine.__name__} of ``{field}`` over the pairs with statistics (None if none)")


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check`; the statistics aggregate every pair that has them."""

    path: str
    other: str | None
    src: str
    dst: str
    transform: list[str]
    pairs: list[PairResult]
    atol: float = 0.0
    rtol: float = 0.0
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    rel_l2: float | None = None  # of every pair with statistics, taken as one vector
    cosine: float | None = None

    @property
    def equal(self) -> bool:
        return all(p.equal for p in self.pairs)

    @property
    def criteria(self) -> Criteria:
        return Criteria(self.atol, self.rtol, self.max_rel_l2, self.min_cosine)

    def _with_stats(self) -> list[TensorStats]:
        return [p.stats for p in self.pairs if p.stats is not None]

    mismatched = _aggregated("mismatched", sum)
    numel = _aggregated("numel", sum)
    max_abs_diff = _aggregated("max_abs_diff", max)
    max_rel_diff = _aggregated("max_rel_diff", max)

    def to_dict(self) -> dict[str, Any]:
        """The ``wsurgery.check/1`` JSON object."""
        agg = None
        if self._with_stats():
            agg = TensorStats(self.equal, self.numel, self.mismatched, self.max_abs_diff, self.max_rel_diff, None)
        stats = _stats_dict(agg)
        stats["cosine"], stats["rel_l2"] = json_float(self.cosine), json_float(self.rel_l2)
        return {
            "schema": "wsurgery.check/1",
            "path": self.path,
            "other": self.other,
            "src": self.src,
            "dst": self.dst,
            "transform": list(self.transform),
            "atol": self.atol,
            "rtol": self.rtol,
            "max_rel_l2": self.max_rel_l2,
            "min_cosine": self.min_cosine,
            "equal": self.equal,
            **stats,
            "pairs": [p.to_dict() for p in self.pairs],
        }

    def to_json(self) -> str:
        """``to_dict()`` as one line of JSON text."""
        return _to_json(self.to_dict())
