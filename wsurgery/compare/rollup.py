"""Tensors rolled up into modules by name prefix (``docs/compare.md``, "Modules").

A module's ``rel_l2`` and ``cosine`` are those of the module's tensors taken as one
vector: ``||A - B|| / ||A||`` and ``A.B / (||A|| ||B||)``, from each tensor's norms and
cosine (sums of squares and dot products, never averages of ratios). The sums are
rescaled by the largest norm and added with ``math.fsum`` (correctly rounded, so the
order of the tensors changes nothing).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..model import natural_key
from .kernel import TensorStats, json_float

__all__ = ["AUTO_MAX_MODULES", "ModuleStats", "auto_depth", "module_of", "roll_up", "total"]

AUTO_MAX_MODULES = 64  # the automatic depth is the deepest that gives at most this many modules


def module_of(name: str, depth: int) -> str:
    """The module of a tensor at ``depth``: its first ``depth`` dot-separated components,
    never the whole name (``layers.0.attn.qkv.weight`` at 2 is ``layers.0``; ``lm_head.weight``
    at 2 is ``lm_head``); a name without a dot belongs to the root module ``""``."""
    parts = name.split(".")
    return ".".join(parts[: min(depth, len(parts) - 1)])


def auto_depth(names: Iterable[str], max_modules: int = AUTO_MAX_MODULES) -> int:
    """The deepest depth that gives at most ``max_modules`` modules (at least 1); where
    deeper depths add no module, the shallowest of them."""
    names = list(names)
    deepest = max((n.count(".") for n in names), default=1)
    best, best_count = 1, len({module_of(n, 1) for n in names})
    for d in range(2, deepest + 1):
        count = len({module_of(n, d) for n in names})
        if count > max_modules:
            break
        if count > best_count:
            best, best_count = d, count
    return best


@dataclass(frozen=True)
class ModuleStats:
    """One module of a rollup.

    Attributes:
        name: the name prefix (``""``: names without a dot).
        tensors: names in both checkpoints under it.
        changed: those that differ (by the report's criteria).
        only_in_a, only_in_b: names under it in one checkpoint only.
        numel: elements compared (names whose shapes differ have no statistics).
        mismatched: elements not equal, or not within tolerance.
        max_abs_diff: the largest ``|a - b|`` of its tensors.
        rel_l2: ``||A - B|| / ||A||`` over its tensors compared as one vector (the rules of a
            tensor's ``rel_l2``); None when it has no compared tensor.
        cosine: the cosine of its tensors as one vector; None when a side has no finite
            non-zero value, or nothing was compared.
    """

    name: str
    tensors: int
    changed: int
    only_in_a: int
    only_in_b: int
    numel: int
    mismatched: int
    max_abs_diff: float | None
    rel_l2: float | None
    cosine: float | None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("max_abs_diff", "rel_l2", "cosine"):
            d[key] = json_float(d[key])
        return d


def _scaled_sum(values: list[float]) -> tuple[float, float]:
    """``(m, s)`` with ``sum(v**2) == m**2 * s``: no overflow or underflow for finite values."""
    m = max(values, default=0.0)
    if m == 0 or not math.isfinite(m):
        return m, (1.0 if values and m else 0.0)
    return m, math.fsum((v / m) ** 2 for v in values)


def total(stats: list[TensorStats]) -> tuple[float | None, float | None]:
    """``(rel_l2, cosine)`` of tensors taken as one vector, from their norms and cosines.

    A pair whose ``||a - b||`` is 0 may lack its norms (a bit-identical pair is never
    summed): when nothing moved, this is ``(0.0, 1.0)`` (``(0.0, None)`` when every value
    is zero) without them; otherwise every pair needs its norms (``ValueError``).
    """
    if not stats:
        return None, None
    if any(s.norm_diff is None for s in stats):
        raise ValueError("statistics without norm_diff")
    if all(s.norm_diff == 0 for s in stats):
        return 0.0, (1.0 if any(s.cosine is not None for s in stats) else None)
    if any(s.norm_a is None or s.norm_b is None for s in stats):
        raise ValueError("statistics without norms")
    norms_a = [s.norm_a for s in stats if s.norm_a is not None]
    norms_b = [s.norm_b for s in stats if s.norm_b is not None]
    diffs = [s.norm_diff for s in stats if s.norm_diff is not None]  # all of them: checked above
    ma, sa = _scaled_sum(norms_a)
    mb, sb = _scaled_sum(norms_b)
    if any(math.isinf(d) for d in diffs) or ma == 0:
        rel = math.inf
    else:
        md, sd = _scaled_sum(diffs)
        rel = math.sqrt(sd / sa) * (md / ma)
    cosine = None  # none beside an unbounded difference, as for one tensor
    if rel < math.inf and 0 < ma < math.inf and 0 < mb < math.inf:
        dot = math.fsum(
            (s.cosine or 0.0) * (na / ma) * (nb / mb) for s, na, nb in zip(stats, norms_a, norms_b, strict=True)
        )
        cosine = min(1.0, max(-1.0, dot / math.sqrt(sa * sb)))
    return rel, cosine


def needs_norms(stats: list[TensorStats]) -> bool:
    """Whether ``total`` needs the norms of the bit-identical pairs among ``stats``."""
    return any(s.norm_diff != 0 for s in stats) and any(s.norm_a is None for s in stats)


def roll_up(
    depth: int,
    rows: list[tuple[str, bool, TensorStats | None]],
    only_in_a: Iterable[str],
    only_in_b: Iterable[str],
) -> list[ModuleStats]:
    """The modules of ``rows`` (``(name, changed, statistics)`` of each name in both) and of
    the names on one side only, in natural order (``layers.2`` before ``layers.10``)."""
    groups: dict[str, dict[str, Any]] = {}

    def group(name: str) -> dict[str, Any]:
        key = module_of(name, depth)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"tensors": 0, "changed": 0, "a": 0, "b": 0, "stats": []}
        return g

    for name, changed, stats in rows:
        g = group(name)
        g["tensors"] += 1
        g["changed"] += bool(changed)
        if stats is not None:
            g["stats"].append(stats)
    for name in only_in_a:
        group(name)["a"] += 1
    for name in only_in_b:
        group(name)["b"] += 1
    out = []
    for key in sorted(groups, key=natural_key):
        g = groups[key]
        st = g["stats"]
        rel, cosine = total(st)
        out.append(
            ModuleStats(
                key,
                g["tensors"],
                g["changed"],
                g["a"],
                g["b"],
                sum(s.numel for s in st),
                sum(s.mismatched for s in st),
                max((s.max_abs_diff for s in st), default=None),
                rel,
                cosine,
            )
        )
    return out
