"""Checkpoint compare: ``diff`` pairs two checkpoints name by name, ``check`` compares
``transform(src)`` with ``dst``; both stream one tensor pair at a time through the
kernel (``wsurgery.compare.kernel``) and return a report (``DiffReport``,
``CheckReport``) that serializes to the ``wsurgery.diff/1`` / ``wsurgery.check/1`` JSON.

Which reason a changed name gets, how ties are compared as relations, where the data
comes from (memory maps, torch, devices) and what memory a compare takes are described in
``docs/compare.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import numpy_apply
from ..distributed import map_by_bytes
from ..errors import SurgeryError, UnknownNameError, UsageError
from ..io.registry import open as load
from ..io.safetensors import FileStored
from ..io.torch_format import from_tensors
from ..model import Checkpoint, Derived, Stored, TensorStored, natural_key
from ..transforms import IDENTITY, Permute, Reshape, Transform, Transpose, parse
from .arrays import dtype_name, torch_to_numpy
from .criteria import Criteria
from .kernel import (
    ONE_THREAD_BLAS,
    TensorStats,
    Tuning,
    check_shapes,
    check_tolerances,
    compare_flat,
    json_float,
    l2_norm,
    resolve_tuning,
)
from .rollup import ModuleStats, auto_depth, module_of, needs_norms, roll_up, total

__all__ = [
    "REASONS",
    "Change",
    "CheckReport",
    "DiffReport",
    "ModuleStats",
    "PairResult",
    "check",
    "compare_tensors",
    "diff",
]

REASONS = ("shape", "dtype", "alias", "value")  # most severe first

Progress = Callable[[int, int], None]  # progress(done_bytes, total_bytes)
# A checkpoint argument: a path of any readable format, a loaded Checkpoint, a state dict,
# or a torch.nn.Module (its state_dict()).
CheckpointLike = str | os.PathLike | Checkpoint | Mapping | Any
AUTO_MIN_CHANGED = 33  # the command line's default rollup: when more names than this changed
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

    def severity(self) -> tuple:
        """Sort key, most severe first: reason, then fraction mismatched, then max |a - b|."""
        s = self.stats
        max_abs = s.max_abs_diff if s is not None and not math.isnan(s.max_abs_diff) else 0.0
        return (REASONS.index(self.reason), -self.mismatched_fraction, -max_abs, natural_key(self.name))

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


# --------------------------------------------------------------------------- arguments


def _arguments(atol, rtol, device, tuning) -> tuple[float, float, str | None, Tuning]:
    """The checked ``(atol, rtol, device, tuning)`` of a compare (``device``: see ``_device``)."""
    atol, rtol = check_tolerances(atol, rtol)
    return atol, rtol, _device(device), resolve_tuning(tuning)


def _device(device) -> str | None:
    """None for CPU (numpy), else a validated torch device string (``UsageError`` if unusable)."""
    if device is None or str(device) == "cpu":
        return None
    from ..surgery import check_device

    return check_device(str(device))


def _is_module(x) -> bool:
    torch = sys.modules.get("torch")  # a module exists only once torch is imported
    return torch is not None and isinstance(x, torch.nn.Module)


def _from_state_dict(sd: Mapping, label: str, what: str) -> Checkpoint:
    """A checkpoint over a state dict's tensors; other entries are listed as skipped."""
    torch = sys.modules.get("torch")
    is_tensor = torch.is_tensor if torch is not None else (lambda v: False)
    for k, v in sd.items():
        if not is_tensor(v) and hasattr(v, "shape") and hasattr(v, "dtype"):
            raise UsageError(
                f"{label}: {str(k)!r} is a {type(v).__name__}; a state dict holds torch tensors",
                param=what,
            )
    tensors = {str(k): v for k, v in sd.items() if is_tensor(v)}
    skipped = [f"{k}: {type(v).__name__}" for k, v in sd.items() if not is_tensor(v)]
    return from_tensors(tensors, path=label, skipped=skipped)


def _open(x, what: str, stack: contextlib.ExitStack) -> tuple[Checkpoint, str]:
    """(checkpoint, a label for reports); a checkpoint opened here closes with ``stack``."""
    if isinstance(x, Checkpoint):
        return x, x.path or "<checkpoint>"
    if isinstance(x, Mapping):
        return _from_state_dict(x, f"<{what}>", what), f"<{what}>"
    if _is_module(x):
        label = f"<{what}: {type(x).__name__}>"
        return _from_state_dict(x.state_dict(), label, what), label
    if isinstance(x, (str, os.PathLike)):
        ckpt = load(x)
        stack.callback(ckpt.close)
        return ckpt, os.fspath(x)
    raise UsageError(
        f"{what}: expected a path, a Checkpoint, a state dict or a torch.nn.Module, got {type(x).__name__}",
        param=what,
    )


# ----------------------------------------------------------------- values and arrays


def _on_cpu(s: Stored) -> bool:
    """Whether a stored tensor's data is in CPU memory (a file's, or a CPU tensor's)."""
    return not isinstance(s, TensorStored) or s.t.device.type == "cpu"


def _cpu_flat(t) -> np.ndarray:
    """A flat numpy view of a torch tensor (copied to the CPU, or made contiguous, if needed)."""
    arr = torch_to_numpy(t, flat=True)
    if arr is None:
        raise SurgeryError(f"cannot compare tensors of dtype {dtype_name(t.dtype)} on the CPU")
    return arr


def _flat(v: Derived, dev: str | None):
    """``(flat array, release)`` of a value: numpy for CPU (``dev`` None), else torch.

    ``release(start_byte, stop_byte)`` unmaps pages already compared (safetensors only).
    An untransformed stored tensor is viewed in place; anything else is materialised.
    """
    s = v.base
    if v.transform.is_identity and isinstance(s, FileStored):
        return numpy_apply.numpy_view(s.raw(), s.dtype, s.shape).reshape(-1), s.release
    if v.transform.is_identity and isinstance(s, TensorStored):
        return (_cpu_flat(s.t) if dev is None else s.t.detach().reshape(-1)), None
    if dev is None and isinstance(s, FileStored) and v.transform.is_view:
        view = numpy_apply.numpy_view(s.raw(), s.dtype, s.shape)
        arr = numpy_apply.apply(v.transform, view, s.dtype, views_only=True)
        flat = np.ascontiguousarray(arr).reshape(-1)
        s.release()
        return flat, None
    t = s.tensor(dev or "cpu")
    out = v.transform.apply(t, allow_copy=True)
    return (_cpu_flat(out) if dev is None else out.reshape(-1)), None


def _compare_values(va: Derived, vb: Derived, *, atol, rtol, dev, tuning: Tuning, advance=None) -> TensorStats:
    fa, rel_a = _flat(va, dev)
    fb, rel_b = _flat(vb, dev)
    return compare_flat(
        fa, fb, atol=atol, rtol=rtol, device=dev, tuning=tuning, release_a=rel_a, release_b=rel_b, advance=advance
    )


def _effective_device(dev: str | None, *ckpts: Checkpoint) -> str | None:
    """With no device asked for, tensors that live on an accelerator are compared there."""
    if dev is not None:
        return dev
    for c in ckpts:
        for s in c.stored.values():
            if not _on_cpu(s):
                return str(s.t.device)
    return None


def _progress_counter(progress: Progress | None, total: int) -> Callable[[int], None]:
    """An ``advance(nbytes)`` that reports ``progress(done, total)`` in bytes of both sides."""
    done = 0
    if progress is not None:
        progress(0, total)

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    return advance


def compare_tensors(
    a: Any,
    b: Any,
    *,
    device: str | None = None,
    chunk_bytes: int | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    tuning: Tuning | None = None,
) -> TensorStats:
    """Compare two same-shape tensors chunk by chunk, as ``diff`` compares each pair:
    ``compare_arrays``'s statistics, with raw bytes screened first and memory bounded by
    a chunk.

    Args:
        a (`torch.Tensor` or `np.ndarray`):
            The first tensor, on any device.
        b (`torch.Tensor` or `np.ndarray`):
            The second tensor, of the same shape (the dtype may differ); ``rtol`` is
            relative to its values.
        device (`str`, *optional*):
            Where to compare (``"cuda:0"``...); None keeps the inputs where they are (a
            CPU input against an accelerator one is compared on the accelerator).
        chunk_bytes (`int`, *optional*, defaults to ``kernel.CHUNK_BYTES``, 32 MiB):
            Bytes per side compared at once: bounds the memory, never the result.
        atol (`float`, *optional*, defaults to 0.0):
            Absolute tolerance: finite and >= 0.
        rtol (`float`, *optional*, defaults to 0.0):
            Tolerance relative to ``|b|``: finite and >= 0.
        tuning (`Tuning`, *optional*):
            Threads to use; None detects them now. The result is the same to the bit
            whatever the tuning.

    Returns:
        `TensorStats`

    Raises:
        SurgeryError: the shapes differ.
        UsageError: a bad tolerance, device or tuning.

    Example:

    ```python
    import torch
    from wsurgery.compare import compare_tensors

    stats = compare_tensors(torch.ones(4), torch.ones(4, dtype=torch.bfloat16))
    assert stats.equal
    ```
    """
    atol, rtol, dev, tuning = _arguments(atol, rtol, device, tuning)
    check_shapes(a.shape, b.shape)
    flats = []
    for x in (a, b):
        if isinstance(x, np.ndarray):
            flats.append(x.reshape(-1))
        elif dev is None and hasattr(x, "device") and x.device.type == "cpu":
            flats.append(_cpu_flat(x))
        else:
            flats.append(x.detach().reshape(-1))
    if dev is None and any(not isinstance(f, np.ndarray) for f in flats):
        dev = next(str(f.device) for f in flats if not isinstance(f, np.ndarray))
    return compare_flat(flats[0], flats[1], atol=atol, rtol=rtol, device=dev, tuning=tuning, chunk_bytes=chunk_bytes)


# ----------------------------------------------------------------------------- ties


def _info(ckpt: Checkpoint, name: str) -> dict[str, Any]:
    e = ckpt.entry(name)
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
        if any(p is None for p in perms.values()):
            return None
        first = min(g, key=natural_key)
        inv = [0] * rank
        for i, d in enumerate(perms[first]):
            inv[d] = i
        rel = {m: tuple(inv[p[i]] for i in range(rank)) for m, p in perms.items()}
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
            jobs[key] = _Job(key, A.value(name), B.value(name))
        return key

    for name in common:
        ea, eb = A.entry(name), B.entry(name)
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
            jobs[key] = _Job(key, A.value(name), B.value(name))
        entries.append(_Entry(name, reason, key))
    return entries, jobs


def diff(
    a: CheckpointLike,
    b: CheckpointLike,
    atol: float = 0.0,
    rtol: float = 0.0,
    device: str | None = None,
    filter: str | None = None,  # noqa: A002 - a glob on names
    progress: Progress | None = None,
    *,
    max_rel_l2: float | None = None,
    min_cosine: float | None = None,
    ignore_ties: bool = False,
    by_module: int | str | None = None,
    by_module_min_changed: int = 0,
    tuning: Tuning | None = None,
) -> DiffReport:
    """Compare two checkpoints name by name, one tensor pair at a time.

    Names in one checkpoint only are listed. A name in both changes when its shape, dtype
    or tie relation differs, or when its values are not equal by every stated criterion:
    the element-wise tolerance (``|a - b| <= atol + rtol * |b|``; with the default zero
    tolerances, equal to the bit but for NaN payloads), ``max_rel_l2``, ``min_cosine``
    (``Criteria``). Tensors are streamed in chunks, so memory stays bounded whatever the
    size of the checkpoints. The rules are in ``docs/compare.md``.

    Args:
        a (`str`, `os.PathLike`, `Checkpoint`, `dict[str, torch.Tensor]` or `torch.nn.Module`):
            The first checkpoint: a path of any readable format, a loaded checkpoint, a
            state dict, or a module (its ``state_dict()``), on any device.
        b (same as ``a``):
            The second checkpoint; ``rtol`` is relative to its values, ``rel_l2`` to
            ``a``'s.
        atol (`float`, *optional*, defaults to 0.0):
            Absolute tolerance: finite and >= 0.
        rtol (`float`, *optional*, defaults to 0.0):
            Tolerance relative to ``|b|``: finite and >= 0.
        device (`str`, *optional*):
            Where to compare: None or ``"cpu"`` (numpy; a diff of safetensors files never
            imports torch), or ``"cuda[:N]"``. With None, tensors that a checkpoint holds
            on an accelerator are compared there.
        filter (`str`, *optional*):
            A glob (``fnmatch``, case-sensitive): only the names it matches are compared.
        progress (`Callable[[int, int], None]`, *optional*):
            Called as ``progress(done_bytes, total_bytes)`` before the first tensor and
            after each chunk.
        max_rel_l2 (`float`, *optional*):
            A tensor whose ``rel_l2 = ||a - b|| / ||a||`` is at most this counts as equal
            (with zero ``atol`` and ``rtol``, the element-wise rule is then not applied).
        min_cosine (`float`, *optional*):
            A tensor whose cosine similarity is at least this (in [-1, 1]) counts as equal,
            as for ``max_rel_l2``.
        ignore_ties (`bool`, *optional*, defaults to False):
            Compare values only: a tie relation that differs is no change by itself.
        by_module (`int` or ``"auto"``, *optional*):
            Roll the tensors up into modules of this many name components (``"auto"``:
            the deepest that gives at most 64 modules): ``report.modules``.
        by_module_min_changed (`int`, *optional*, defaults to 0):
            Roll up only when at least this many names changed.
        tuning (`Tuning`, *optional*):
            Threads to use; None detects them now (``Tuning.detect()``). The report is
            the same to the bit whatever the tuning.

    Returns:
        `DiffReport`: ``equal``, ``only_in_a``, ``only_in_b``, ``changed`` (most severe
        first, each with its ``reason`` and statistics), ``same`` and ``modules``;
        ``to_dict()`` is the ``wsurgery.diff/1`` JSON object, ``to_json()`` its text.

    Raises:
        UsageError: a tolerance that is not a finite number >= 0 (``param`` ``"atol"`` or
            ``"rtol"``), a ``max_rel_l2`` that is not, a ``min_cosine`` outside [-1, 1],
            a ``by_module`` that is neither a depth >= 1 nor ``"auto"``, an unusable
            ``device``, an input of another type, or a ``filter`` that matches no name in
            either checkpoint.
        InputError: an input that cannot be read. A diff never reports "equal" for work
            it could not do.

    Example:

    ```python
    import wsurgery

    report = wsurgery.diff("model.safetensors", "model.pt", atol=1e-6)
    for change in report.changed:
        print(change.name, change.reason, change.stats)
    ```
    """
    atol, rtol, dev, tuning = _arguments(atol, rtol, device, tuning)
    crit = Criteria.of(atol, rtol, max_rel_l2, min_cosine)
    by_module = _check_depth(by_module)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ONE_THREAD_BLAS)  # one setting for every dot product of the diff
        A, label_a = _open(a, "a", stack)
        B, label_b = _open(b, "b", stack)
        dev = _effective_device(dev, A, B)

        def keep(name: str) -> bool:
            return filter is None or fnmatch.fnmatchcase(name, filter)

        names_a = [n for n in A.names() if keep(n)]
        names_b = [n for n in B.names() if keep(n)]
        if filter is not None and not names_a and not names_b:
            raise UsageError(
                f"filter {filter!r} matches no tensor in {label_a} or {label_b}",
                param="filter",
                hint="check the glob (e.g. 'encoder.*')",
            )
        only_a = [n for n in names_a if n not in B]
        only_b = [n for n in names_b if n not in A]
        common = [n for n in names_a if n in B]

        entries, jobs = _plan_diff(A, B, common, ignore_ties)
        total = sum(j.va.nbytes + j.vb.nbytes for j in jobs.values())
        advance = _progress_counter(progress, total)

        # Under a process group each rank compares its share (by bytes); every rank gets all the stats.
        stats_of = map_by_bytes(
            list(jobs.values()),
            lambda j: j.va.nbytes + j.vb.nbytes,
            lambda j: _compare_values(j.va, j.vb, atol=atol, rtol=rtol, dev=dev, tuning=tuning, advance=advance),
            skipped=advance,
        )
        for job, job_stats in zip(jobs.values(), stats_of, strict=True):
            job.stats = job_stats

        def entry_stats(e: _Entry) -> TensorStats | None:
            return jobs[e.job].stats if e.job is not None else None

        reasons = [e.reason or (None if crit.holds(entry_stats(e)) else "value") for e in entries]
        depth = modules = None
        if by_module is not None and sum(r is not None for r in reasons) >= by_module_min_changed:
            depth = auto_depth([*names_a, *only_b]) if by_module == "auto" else by_module
            _add_norms(
                [(module_of(e.name, depth), e.job) for e in entries if e.job is not None], jobs, dev=dev, tuning=tuning
            )
            rows = [(e.name, r is not None, entry_stats(e)) for e, r in zip(entries, reasons, strict=True)]
            modules = roll_up(depth, rows, only_a, only_b)
        changed = [
            Change(e.name, r, _info(A, e.name), _info(B, e.name), entry_stats(e))
            for e, r in zip(entries, reasons, strict=True)
            if r is not None
        ]
        changed.sort(key=Change.severity)
        same = len(entries) - len(changed)
        return DiffReport(
            label_a,
            label_b,
            only_a,
            only_b,
            changed,
            same,
            atol,
            rtol,
            total,
            crit.max_rel_l2,
            crit.min_cosine,
            bool(ignore_ties),
            depth,
            modules,
            # the non-tensor entries ("name: what") whose names pass the filter
            [s for s in A.skipped if keep(s.split(": ", 1)[0])],
            [s for s in B.skipped if keep(s.split(": ", 1)[0])],
        )


def _check_depth(by_module) -> int | str | None:
    if by_module is None or by_module == "auto":
        return by_module
    if isinstance(by_module, bool) or not isinstance(by_module, int) or by_module < 1:
        raise UsageError(
            f"by_module must be a depth >= 1 or 'auto', got {by_module!r}",
            param="by_module",
            hint="a depth counts name components: 2 rolls 'layers.0.attn.qkv.weight' into 'layers.0'",
        )
    return by_module


def _add_norms(groups: list[tuple[str, str]], jobs: dict[str, _Job], *, dev, tuning: Tuning) -> None:
    """Give the bit-identical pairs of every group (``(group, job key)``) in which some
    pair moved the norms that ``rollup.total`` needs: one more pass over their data
    (``||a|| == ||b||``: one side is read)."""
    members: dict[str, list[str]] = {}
    for group, key in groups:
        members.setdefault(group, []).append(key)
    todo: dict[str, None] = {}
    for keys in members.values():
        stats = [jobs[k].stats for k in keys if jobs[k].stats is not None]
        if needs_norms(stats):
            todo.update((k, None) for k in keys if jobs[k].stats is not None and jobs[k].stats.norm_a is None)

    def norm(job: _Job) -> float:
        flat, release = _flat(job.va, dev)
        return l2_norm(flat, device=dev, tuning=tuning, release=release)

    # Under a process group each rank reads its share (by bytes); every rank gets every norm.
    chosen = [jobs[k] for k in todo]
    for job, n in zip(chosen, map_by_bytes(chosen, lambda j: j.va.nbytes, norm), strict=True):
        job.stats = dataclasses.replace(job.stats, norm_a=n, norm_b=n)


# ----------------------------------------------------------------------------- check


def check(
    ckpt: CheckpointLike,
    src: str,
    dst: str,
    transform: str | Transform | list[str] | None = None,
    other: CheckpointLike | None = None,
    atol: float = 0.0,
    rtol: float = 0.0,
    device: str | None = None,
    progress: Progress | None = None,
    *,
    max_rel_l2: float | None = None,
    min_cosine: float | None = None,
    tuning: Tuning | None = None,
) -> CheckReport:
    """Check that ``transform(src)`` equals ``dst`` within tolerance.

    ``src`` and ``dst`` may be module prefixes: every tensor under ``src`` is checked
    against the tensor of the same relative name under ``dst``. A pair differs when the
    shapes differ (no statistics), when the dtypes differ (values still compared, after
    upcasting), or when its values are not equal by every stated criterion, as for
    :func:`diff` (``|a - b| <= atol + rtol * |b|``, with ``b`` the ``dst`` value;
    ``max_rel_l2``; ``min_cosine``). The rules are in ``docs/compare.md``.

    Args:
        ckpt (`str`, `os.PathLike`, `Checkpoint` or `dict[str, torch.Tensor]`):
            The checkpoint holding ``src`` (and ``dst``, unless ``other`` is given).
        src (`str`):
            A tensor name or module prefix in ``ckpt``.
        dst (`str`):
            A tensor name or module prefix in ``other``, or else in ``ckpt``.
        transform (`str`, `Transform` or `list[str]`, *optional*):
            Transform steps applied to ``src`` (``"transpose"``, ``["slice(0,0,4)",
            "cast(float32)"]``...); None compares ``src`` as it is.
        other (same as ``ckpt``, *optional*):
            A second checkpoint to take ``dst`` from.
        atol (`float`, *optional*, defaults to 0.0):
            Absolute tolerance: finite and >= 0.
        rtol (`float`, *optional*, defaults to 0.0):
            Tolerance relative to ``|dst|``: finite and >= 0.
        device (`str`, *optional*):
            Where to compare, as for :func:`diff`.
        progress (`Callable[[int, int], None]`, *optional*):
            Called as ``progress(done_bytes, total_bytes)``, as for :func:`diff`.
        max_rel_l2 (`float`, *optional*):
            A pair whose ``||src - dst|| / ||src||`` is at most this counts as equal, as
            for :func:`diff`.
        min_cosine (`float`, *optional*):
            A pair whose cosine similarity is at least this counts as equal, as for
            :func:`diff`.
        tuning (`Tuning`, *optional*):
            Threads to use; None detects them now. The report is the same to the bit
            whatever the tuning.

    Returns:
        `CheckReport`: ``equal``, the aggregated ``mismatched``, ``numel``,
        ``max_abs_diff``, ``max_rel_diff``, ``rel_l2`` and ``cosine`` (the pairs taken as
        one vector), and one ``PairResult`` per pair; ``to_dict()`` is the
        ``wsurgery.check/1`` JSON object, ``to_json()`` its text.

    Raises:
        UnknownNameError: ``src`` or a destination is not in its checkpoint.
        TransformError: the transform does not parse or does not fit a source.
        UsageError: a bad tolerance, device or input type.
        InputError: an input that cannot be read.

    Example:

    ```python
    import wsurgery

    report = wsurgery.check("model.safetensors", "embed.weight", "lm_head.weight", transform="transpose")
    assert report.equal, report.to_dict()
    ```
    """
    from ..surgery import pair_names

    atol, rtol, dev, tuning = _arguments(atol, rtol, device, tuning)
    crit = Criteria.of(atol, rtol, max_rel_l2, min_cosine)
    t = parse(transform)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ONE_THREAD_BLAS)
        C, label = _open(ckpt, "ckpt", stack)
        D, other_label = C, None
        if other is not None:
            D, other_label = _open(other, "other", stack)
        dev = _effective_device(dev, C, D)
        pairs = pair_names(C, src, D, dst)
        missing = [d for _, d in pairs if d not in D]
        if missing:
            if len(pairs) == 1:
                raise D.unknown(missing[0])
            where = f" in {D.path}" if D.path else ""
            raise UnknownNameError(
                missing[0],
                path=D.path,
                message=f"{len(missing)} of {len(pairs)} destinations are missing{where}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else ""),
                hint="check the destination, or that both module prefixes hold the same tensors",
            )
        values = [(s, d, C.value(s, t), D.value(d)) for s, d in pairs]  # infer first: fails early

        advance = _progress_counter(
            progress, sum(vs.nbytes + vd.nbytes for _, _, vs, vd in values if vs.shape == vd.shape)
        )

        # Under a process group each rank compares its share (by bytes); every rank gets all the stats.
        computed = iter(
            map_by_bytes(
                [(vs, vd) for _, _, vs, vd in values if vs.shape == vd.shape],
                lambda p: p[0].nbytes + p[1].nbytes,
                lambda p: _compare_values(p[0], p[1], atol=atol, rtol=rtol, dev=dev, tuning=tuning, advance=advance),
                skipped=advance,
            )
        )
        results: list[PairResult] = []
        for s, d, vs, vd in values:
            info_s = {"dtype": vs.dtype, "shape": list(vs.shape)}
            info_d = _info(D, d)
            if vs.shape != vd.shape:
                results.append(PairResult(s, d, "shape", info_s, info_d, None))
                continue
            stats = next(computed)
            reason = "dtype" if vs.dtype != vd.dtype else (None if stats.equal else "value")
            results.append(PairResult(s, d, reason, info_s, info_d, stats))

        results = [
            r if r.reason in ("shape", "dtype") else dataclasses.replace(r, reason=_pair_reason(crit, r.stats))
            for r in results
        ]
        jobs = {r.dst: _Job(r.dst, vs, vd, r.stats) for r, (_, _, vs, vd) in zip(results, values, strict=True)}
        _add_norms([("", r.dst) for r in results if r.stats is not None], jobs, dev=dev, tuning=tuning)
        rel, cosine = total([j.stats for j in jobs.values() if j.stats is not None])
        results = [dataclasses.replace(r, stats=jobs[r.dst].stats) for r in results]
        return CheckReport(
            label, other_label, src, dst, t.specs(), results, atol, rtol, crit.max_rel_l2, crit.min_cosine, rel, cosine
        )


def _pair_reason(crit: Criteria, stats: TensorStats | None) -> str | None:
    return None if crit.holds(stats) else "value"
