"""When a compared tensor pair counts as equal: the element-wise tolerance and the
tensor-level thresholds (``max_rel_l2``, ``min_cosine``), checked and combined in one
place for ``diff``, ``check`` and ``wsurgery.testing`` (``docs/compare.md``, "Thresholds").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError
from .kernel import TensorStats, check_tolerances

__all__ = ["Criteria"]


def _threshold(value, param: str, low: float, high: float | None) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{param} must be a number, got {value!r}", param=param) from None
    if isinstance(value, bool) or not math.isfinite(x) or x < low or (high is not None and x > high):
        span = f"between {low:g} and {high:g}" if high is not None else f"finite and >= {low:g}"
        raise UsageError(f"{param} must be {span}, got {value!r}", param=param)
    return x


@dataclass(frozen=True)
class Criteria:
    """What makes a compared pair equal. Every stated criterion must hold:

    * the element-wise tolerance (every element ``|a - b| <= atol + rtol * |b|``: the
      ``equal`` of the statistics) is stated when ``atol`` or ``rtol`` is > 0, or when no
      tensor-level threshold is given (then it means exact equality, the default);
    * ``max_rel_l2``: ``rel_l2 <= max_rel_l2``;
    * ``min_cosine``: ``cosine >= min_cosine``, or the values are the same (``||a - b||
      == 0``: two all-zero tensors have no cosine but are equal).

    A mismatch that involves a non-finite value (NaN against a number, an infinity
    against anything else) makes ``rel_l2`` infinite and fails both thresholds.
    """

    atol: float = 0.0
    rtol: float = 0.0
    max_rel_l2: float | None = None
    min_cosine: float | None = None

    @classmethod
    def of(cls, atol=0.0, rtol=0.0, max_rel_l2=None, min_cosine=None) -> Criteria:
        """Checked criteria: tolerances finite and >= 0, ``max_rel_l2`` finite and >= 0,
        ``min_cosine`` in [-1, 1]; otherwise ``UsageError`` naming the parameter."""
        atol, rtol = check_tolerances(atol, rtol)
        return cls(
            atol,
            rtol,
            _threshold(max_rel_l2, "max_rel_l2", 0.0, None),
            _threshold(min_cosine, "min_cosine", -1.0, 1.0),
        )

    @property
    def elementwise(self) -> bool:
        """Whether the element-wise tolerance is one of the criteria."""
        return self.atol > 0 or self.rtol > 0 or (self.max_rel_l2 is None and self.min_cosine is None)

    def holds(self, stats: TensorStats | None) -> bool:
        """Whether a pair with these statistics counts as equal (no statistics: never)."""
        if stats is None:
            return False
        if self.elementwise and not stats.equal:
            return False
        if self.max_rel_l2 is not None and not (stats.rel_l2 is not None and stats.rel_l2 <= self.max_rel_l2):
            return False
        if self.min_cosine is not None:
            same = stats.rel_l2 == 0  # ||a - b|| == 0, no non-finite mismatch
            near = stats.cosine is not None and stats.cosine >= self.min_cosine
            bounded = stats.rel_l2 is not None and math.isfinite(stats.rel_l2)
            if not (same or (near and bounded)):
                return False
        return True

    def describe(self) -> str:
        """``atol 0, rtol 0`` / ``max_rel_l2 0.001, min_cosine 0.999``: the stated criteria."""
        parts = []
        if self.elementwise:
            parts.append(f"atol {self.atol:g}, rtol {self.rtol:g}")
        if self.max_rel_l2 is not None:
            parts.append(f"max_rel_l2 {self.max_rel_l2:g}")
        if self.min_cosine is not None:
            parts.append(f"min_cosine {self.min_cosine:g}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "max_rel_l2": self.max_rel_l2, "min_cosine": self.min_cosine}
