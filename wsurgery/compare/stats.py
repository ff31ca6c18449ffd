"""Results and arguments of a compare: ``TensorStats``, ``Tuning``, the tolerance and
shape checks, and ``_Acc``, the exact float64 statistics accumulated over blocks
(combined in block order, so the results never depend on the threads)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import SurgeryError, UsageError

_MAX_WORKERS = 4


# --------------------------------------------------------------------- tuning, arguments


@dataclass(frozen=True)
class Tuning:
    """How a compare uses the machine, never what it computes.

    Every statistic is the same to the bit whatever the tuning: the work is cut into the
    same blocks and their partial results are folded in the same order, however many
    threads compute them, and numpy's BLAS is held on one thread while a compare runs
    (its own thread setting changes nothing; ``docs/compare.md``, "Tuning and
    reproducibility").

    Attributes:
        workers: threads that share the work on one tensor pair, the calling thread
            included: byte screening, the float kernel and the sums of identical
            blocks. 1 runs everything on the calling thread.

    Example:

    ```python
    from wsurgery.compare import Tuning, diff

    report = diff("a.safetensors", "b.safetensors", tuning=Tuning(workers=1))
    ```
    """

    workers: int

    def __post_init__(self):
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise UsageError(f"tuning: workers must be an integer >= 1, got {w!r}", param="tuning")

    @classmethod
    def detect(cls, local_ranks: int = 1) -> Tuning:
        """The default tuning, read when called (never at import): the CPUs this process
        may run on (its affinity) shared among ``local_ranks`` processes of the node, at
        most 4 per process (memory bandwidth is the limit beyond), at least 1.

        Args:
            local_ranks: processes comparing on this node at once (under ``torchrun``, its
                ``LOCAL_WORLD_SIZE``, which the caller reads): each gets its share.
        """
        from ..partition import node_share, usable_cores

        ranks = local_ranks if isinstance(local_ranks, int) and not isinstance(local_ranks, bool) else 1
        return cls(workers=min(node_share(usable_cores(), ranks), _MAX_WORKERS))


def resolve_tuning(tuning: Tuning | None) -> Tuning:
    """``tuning``, or the one detected now when it is None."""
    if tuning is None:
        return Tuning.detect()
    if not isinstance(tuning, Tuning):
        raise UsageError(f"tuning must be a Tuning, got {type(tuning).__name__}", param="tuning")
    return tuning


def check_tolerances(atol, rtol) -> tuple[float, float]:
    """``(atol, rtol)`` as floats. Each must be a finite number >= 0: anything else (a
    negative value, NaN, ``inf``, a string) raises ``UsageError`` with ``param`` set to
    ``"atol"`` or ``"rtol"``."""
    out = []
    for param, value in (("atol", atol), ("rtol", rtol)):
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise UsageError(
                f"{param} must be a number, got {value!r}", param=param, hint="pass a number such as 1e-6"
            ) from None
        if not (math.isfinite(x) and x >= 0):
            raise UsageError(
                f"{param} must be finite and >= 0, got {x}",
                param=param,
                hint="pass a finite, non-negative tolerance such as 1e-6",
            )
        out.append(x)
    return out[0], out[1]


def check_shapes(shape_a, shape_b) -> None:
    """``SurgeryError`` naming both shapes unless they are the same."""
    shape_a, shape_b = tuple(int(s) for s in shape_a), tuple(int(s) for s in shape_b)
    if shape_a != shape_b:
        raise SurgeryError(
            f"shape mismatch: {list(shape_a)} vs {list(shape_b)}",
            hint="only tensors of the same shape can be compared element by element",
        )


# --------------------------------------------------------------------------- result


def json_float(x: float | None) -> float | str | None:
    """A float for JSON: finite values as they are, None as None, and the non-finite ones
    as the strings ``"Infinity"``, ``"-Infinity"`` and ``"NaN"`` (what Python's ``float()``
    and JavaScript's ``Number()`` read back), so the output stays valid JSON."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


@dataclass(frozen=True)
class TensorStats:
    """Equality and difference statistics of one tensor pair (``docs/compare.md``, "Statistics").

    Attributes:
        equal: no element mismatched.
        numel: elements compared.
        mismatched: elements not equal, or not within tolerance.
        max_abs_diff: max ``|a - b|``; ``inf`` when a mismatch involves a non-finite value.
        max_rel_diff: max ``|a - b| / |b|``, with the same rule; ``inf`` where ``b == 0 != a``.
        cosine: cosine similarity over the positions where both values are finite (float64
            sums); None when a side has no finite non-zero value there, or ``numel == 0``.
        rel_l2: ``||a - b|| / ||a||`` (L2 norms, float64 sums over the positions where both
            values are finite); 0.0 when ``||a - b|| == 0`` (equal values, or ``numel ==
            0``), ``inf`` when ``||a|| == 0`` and ``||a - b|| > 0`` or when a mismatch
            involves a non-finite value. None only where it was not computed.
        norm_a, norm_b: ``||a||`` and ``||b||`` over the positions where both values are
            finite; None when not computed (a bit-identical pair is never summed).
        norm_diff: ``||a - b||`` over those positions (``inf`` when a mismatch involves a
            non-finite value); 0.0 for a bit-identical pair.
    """

    equal: bool
    numel: int
    mismatched: int
    max_abs_diff: float
    max_rel_diff: float
    cosine: float | None
    rel_l2: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None
    norm_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become ``"Infinity"``, ``"-Infinity"`` or
        ``"NaN"`` (``json_float``)."""
        return {
            "equal": self.equal,
            "numel": self.numel,
            "mismatched": self.mismatched,
            "max_abs_diff": json_float(self.max_abs_diff),
            "max_rel_diff": json_float(self.max_rel_diff),
            "cosine": json_float(self.cosine),
            "rel_l2": json_float(self.rel_l2),
        }


# ------------------------------------------------------------------------ dtypes
def _kind(name: str) -> str:
    if name == "bool":
        return "bool"
    if name.startswith("complex"):
        return "complex"
    if name.startswith("uint"):
        return "uint"
    if name.startswith("int"):
        return "int"
    if "float" in name:  # float*, bfloat16, float8_*
        return "float"
    raise SurgeryError(f"cannot compare tensors of dtype {name}")


def _plan(name_a: str, name_b: str) -> str:
    """How to compare: 'float', 'complex', or an integer plan ('int', 'ubias', 'mixed')."""
    kinds = {_kind(name_a), _kind(name_b)}
    if "complex" in kinds:
        return "complex"
    if "float" in kinds:
        return "float"
    if "uint64" not in (name_a, name_b):
        return "int"  # both fit int64 exactly
    return "mixed" if "int" in kinds else "ubias"


# ------------------------------------------------------------------ accumulating, threads


class _Acc:
    """Running statistics of one tensor pair, over blocks or pieces: mismatch counts and
    maxima, the float64 cosine sums (``dot``, ``na`` = |a|^2, ``nb`` = |b|^2) and ``dd`` =
    |a - b|^2, all over the positions where both values are finite; ``unbounded``: some
    mismatch involves a non-finite value."""

    def __init__(self):
        self.mismatched = 0
        self.max_abs = 0.0
        self.max_abs_int = 0  # exact, integer plans
        self.max_rel = 0.0
        self.dot = 0.0
        self.na = 0.0
        self.nb = 0.0
        self.dd = 0.0
        self.unbounded = False

    def add_identical(self, sq: float):
        """A block that is the same on both sides, with sum of squares ``sq``."""
        self.dot += sq
        self.na += sq
        self.nb += sq

    def add_sums(self, dot: float, na: float, nb: float) -> None:
        self.dot += dot
        self.na += na
        self.nb += nb

    def add_piece(self, o: _Acc) -> None:
        """The mismatch statistics and ``dd`` (not the cosine sums) of a piece compared
        on its own."""
        self.mismatched += o.mismatched
        self.max_abs = max(self.max_abs, o.max_abs, float(o.max_abs_int))
        self.max_rel = max(self.max_rel, o.max_rel)
        self.dd += o.dd
        self.unbounded = self.unbounded or o.unbounded

    def merge(self, o: _Acc) -> None:
        self.mismatched += o.mismatched
        self.max_abs = max(self.max_abs, o.max_abs)
        self.max_abs_int = max(self.max_abs_int, o.max_abs_int)
        if o.max_rel > self.max_rel:
            self.max_rel = o.max_rel
        self.add_sums(o.dot, o.na, o.nb)
        self.dd += o.dd
        self.unbounded = self.unbounded or o.unbounded

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs, float(self.max_abs_int))

    def stats(self, numel: int, cosine: float | None, norms: tuple | None = None) -> TensorStats:
        """``norms``: ``(rel_l2, norm_a, norm_b, norm_diff)`` (``_l2``). A pair whose
        difference is unbounded (a NaN or infinity against another value) has no cosine:
        its sums cover the finite positions only, and ``1.0`` beside ``rel_l2 = inf``
        would hide the change."""
        if self.unbounded:
            cosine = None
        return TensorStats(
            self.mismatched == 0, numel, self.mismatched, self.max_abs_diff, self.max_rel, cosine, *(norms or ())
        )


def _cosine(dot: float, na: float, nb: float) -> float | None:
    """The cosine from the float64 sums (None when a norm is 0)."""
    if not (na > 0 and nb > 0):
        return None
    p = na * nb  # one rounding less than sqrt(na) * sqrt(nb), unless out of range
    norm = math.sqrt(p) if sys.float_info.min <= p < math.inf else math.sqrt(na) * math.sqrt(nb)
    c = dot / norm
    return min(1.0, max(-1.0, c))


def _l2(
    na: float, nb: float, dd: float, unbounded: bool, ma: float = 1.0, mb: float = 1.0, s: float = 1.0
) -> tuple[float, float, float, float]:
    """``(rel_l2, norm_a, norm_b, norm_diff)`` from float64 sums of squares: ``na`` of
    ``a / ma``, ``nb`` of ``b / mb``, ``dd`` of ``(a - b) / s`` (scales 1 unless rescaled)."""
    norm_a, norm_b = ma * math.sqrt(na), mb * math.sqrt(nb)
    if unbounded:
        return math.inf, norm_a, norm_b, math.inf
    norm_diff = s * math.sqrt(dd)
    if dd == 0:
        return 0.0, norm_a, norm_b, norm_diff
    if na == 0:
        return math.inf, norm_a, norm_b, norm_diff
    q = dd / na
    if sys.float_info.min <= q < math.inf:
        rel = math.sqrt(q)  # one rounding less than sqrt(dd) / sqrt(na)
    else:
        rel = math.sqrt(dd) / math.sqrt(na)
    return (rel if s == ma else rel * (s / ma)), norm_a, norm_b, norm_diff


def _needs_rescale(plan: str, names: set[str], acc: _Acc) -> tuple[bool, bool]:
    """Whether float64 sums went out of range: ``(for the cosine, for the norms)``.

    Only float64 / complex128 inputs can underflow (a zero sum of squares may be one of
    values below 1e-154); any float input can overflow. Non-finite values themselves are
    never summed (``unbounded`` says what they did)."""
    if plan not in ("float", "complex"):
        return False, False
    wide = bool(names & {"float64", "complex128"})
    finite = all(math.isfinite(v) for v in (acc.dot, acc.na, acc.nb))
    cos = not finite or (wide and (acc.na == 0 or acc.nb == 0))
    tiny = sys.float_info.min
    norms = (
        not finite
        or not math.isfinite(acc.dd)
        or (wide and (acc.na < tiny or acc.nb < tiny or (acc.dd < tiny and acc.max_abs_diff > 0)))
    )
    return cos, norms
