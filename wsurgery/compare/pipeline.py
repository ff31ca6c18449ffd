"""The one compare pipeline of ``diff`` and ``check``: options resolved (``CompareOptions``),
inputs opened, value pairs compared one at a time (spread over ranks by the caller's
``Mapper``), norms added for rollups; and ``compare_tensors`` for one tensor pair."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import lookup
from ..errors import UnknownNameError, UsageError
from ..selectors import matches, unknown
from ..transforms import Transform, parse
from .inputs import (
    CheckpointLike,
    Progress,
    StridedFlat,
    _cpu_flat,
    _device,
    _device_flat,
    _effective_device,
    _flat,
    _open,
)
from .kernel import (
    ONE_THREAD_BLAS,
    TensorStats,
    Tuning,
    check_shapes,
    check_tolerances,
    compare_flat,
    l2_norm,
    resolve_tuning,
)
from .options import CompareOptions, Mapper, serial_map
from .pairing import _Entry, _info, _Job, _plan_diff
from .reports import Change, CheckReport, DiffReport, PairResult
from .rollup import auto_depth, module_of, needs_norms, roll_up, total

__all__ = ["check", "compare_tensors", "diff"]


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


class _Run:
    """One compare of ``diff`` or ``check``: its options resolved, the inputs it opened
    (closed with it), one BLAS setting for every dot product, and the pairs compared
    through the caller's mapper."""

    def __init__(self, options: CompareOptions, progress: Progress | None, mapper: Mapper | None):
        self.options = options
        self.criteria = options.criteria
        self.dev = _device(options.device)
        self.tuning = resolve_tuning(options.tuning)
        self.progress = progress
        self.mapper: Mapper = mapper if mapper is not None else serial_map
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Run:
        self._stack.__enter__()
        self._stack.enter_context(ONE_THREAD_BLAS)
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)

    def open(self, x: CheckpointLike, what: str):
        """``(checkpoint, label)`` of an input; a file opened here closes with the run."""
        ckpt, label = _open(x, what, self._stack)
        return ckpt, label

    def place(self, *ckpts) -> None:
        """With no device asked for, tensors held on an accelerator are compared there."""
        self.dev = _effective_device(self.dev, *ckpts)

    def _stats(self, job: _Job, advance: Callable[[int], None]) -> TensorStats:
        fa, rel_a = _flat(job.va, self.dev)
        fb, rel_b = _flat(job.vb, self.dev)
        o = self.options
        return compare_flat(
            fa, fb, atol=o.atol, rtol=o.rtol, device=self.dev, tuning=self.tuning,
            release_a=rel_a, release_b=rel_b, advance=advance,
        )  # fmt: skip

    def compare(self, jobs: list[_Job]) -> int:
        """Give every job its statistics, one pair at a time; the bytes compared."""
        total_bytes = sum(j.va.nbytes + j.vb.nbytes for j in jobs)
        advance = _progress_counter(self.progress, total_bytes)
        stats = self.mapper(
            jobs, lambda j: j.va.nbytes + j.vb.nbytes, lambda j: self._stats(j, advance), skipped=advance
        )
        for job, s in zip(jobs, stats, strict=True):
            job.stats = s
        return total_bytes

    def add_norms(self, groups: list[tuple[str, str]], jobs: dict[str, _Job]) -> None:
        """Give the bit-identical pairs of every group (``(group, job key)``) in which some
        pair moved the norms that ``rollup.total`` needs: one more pass over their data
        (``||a|| == ||b||``: one side is read)."""
        members: dict[str, list[str]] = {}
        for group, key in groups:
            members.setdefault(group, []).append(key)
        todo: dict[str, None] = {}
        for keys in members.values():
            got = [s for s in (jobs[k].stats for k in keys) if s is not None]
            if needs_norms(got):
                for k in keys:
                    s = jobs[k].stats
                    if s is not None and s.norm_a is None:
                        todo[k] = None

        def norm(job: _Job) -> float:
            flat, release = _flat(job.va, self.dev)
            return l2_norm(flat, device=self.dev, tuning=self.tuning, release=release)

        chosen = [jobs[k] for k in todo]
        for job, n in zip(chosen, self.mapper(chosen, lambda j: j.va.nbytes, norm), strict=True):
            assert job.stats is not None
            job.stats = dataclasses.replace(job.stats, norm_a=n, norm_b=n)


def _is_numpy(flat: Any) -> bool:
    """Whether a flat input is compared with numpy (an array, or a strided numpy view)."""
    return isinstance(flat, np.ndarray) or (isinstance(flat, StridedFlat) and not flat.torch)


def _selected(names: list[str], selector: str | None) -> list[str]:
    return list(names) if selector is None else matches(names, selector)


def _skipped(entries: list[str], selector: str | None) -> list[str]:
    """The non-tensor entries (``"name: what"``) whose names the filter selects."""
    chosen = set(_selected([s.split(": ", 1)[0] for s in entries], selector))
    return [s for s in entries if s.split(": ", 1)[0] in chosen]


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
    atol, rtol = check_tolerances(atol, rtol)
    dev, tuning = _device(device), resolve_tuning(tuning)
    check_shapes(a.shape, b.shape)
    flats = []
    for x in (a, b):
        if isinstance(x, np.ndarray):
            flats.append(x.reshape(-1))
        elif dev is None and hasattr(x, "device") and x.device.type == "cpu":
            flats.append(_cpu_flat(x))
        else:
            flats.append(_device_flat(x))
    on_torch = [f for f in flats if not _is_numpy(f)]
    if dev is None and on_torch:
        dev = str(on_torch[0].device)
    return compare_flat(flats[0], flats[1], atol=atol, rtol=rtol, device=dev, tuning=tuning, chunk_bytes=chunk_bytes)


def diff(
    a: CheckpointLike,
    b: CheckpointLike,
    options: CompareOptions | None = None,
    *,
    progress: Progress | None = None,
    mapper: Mapper | None = None,
    **fields: Any,
) -> DiffReport:
    """Compare two checkpoints name by name, one tensor pair at a time.

    Names in one checkpoint only are listed. A name in both changes when its shape, dtype
    or tie relation differs, or when its values are not equal by every stated criterion
    (``CompareOptions``: the element-wise tolerance, ``max_rel_l2``, ``min_cosine``).
    Tensors are streamed in chunks, so memory stays bounded whatever the size of the
    checkpoints. The rules are in ``docs/compare.md``.

    Args:
        a (`str`, `os.PathLike`, `Checkpoint`, `dict[str, torch.Tensor]` or `torch.nn.Module`):
            The first checkpoint: a path of any readable format, a loaded checkpoint, a
            state dict, or a module (its ``state_dict()``), on any device.
        b (same as ``a``):
            The second checkpoint; ``rtol`` is relative to its values, ``rel_l2`` to ``a``'s.
        options (`CompareOptions`, *optional*):
            Tolerances, thresholds, ties, rollup, filter, device, tuning.
        progress (`Callable[[int, int], None]`, *optional*):
            Called as ``progress(done_bytes, total_bytes)`` before the first tensor and
            after each chunk.
        mapper (`Mapper`, *optional*):
            How the pairs are spread: serial by default; ``wsurgery.distributed.map_by_bytes``
            under ``torchrun`` (each rank compares its share, every rank gets the report).
        **fields: ``CompareOptions`` fields (``atol=1e-6``...), replacing those of ``options``.

    Returns:
        `DiffReport`: ``equal``, ``only_in_a``, ``only_in_b``, ``changed`` (most severe
        first), ``same``, ``modules``; ``to_dict()`` is the ``wsurgery.diff/1`` JSON object.

    Raises:
        UsageError: a bad option (``param`` names it) or an input of another type.
        UnknownNameError: a ``filter`` that selects no name in either checkpoint.
        InputError: an input that cannot be read, or a state dict holding a tensor that
            cannot be compared (sparse, meta, nested). A diff never reports "equal" for
            work it could not do.

    Example:

    ```python
    import wsurgery

    report = wsurgery.diff("model.safetensors", "model.pt", atol=1e-6)
    for change in report.changed:
        print(change.name, change.reason, change.stats)
    ```
    """
    opts = CompareOptions.of(options, **fields)
    with _Run(opts, progress, mapper) as run:
        A, label_a = run.open(a, "a")
        B, label_b = run.open(b, "b")
        run.place(A, B)
        all_a, all_b = list(A.names()), list(B.names())
        names_a, names_b = _selected(all_a, opts.filter), _selected(all_b, opts.filter)
        if opts.filter is not None and not names_a and not names_b:
            raise unknown(list(dict.fromkeys(all_a + all_b)), opts.filter, path=f"{label_a} or {label_b}")
        only_a = [n for n in names_a if n not in B]
        only_b = [n for n in names_b if n not in A]
        common = [n for n in names_a if n in B]

        entries, jobs = _plan_diff(A, B, common, opts.ignore_ties)
        total_bytes = run.compare(list(jobs.values()))

        def entry_stats(e: _Entry) -> TensorStats | None:
            return jobs[e.job].stats if e.job is not None else None

        crit = run.criteria
        reasons = [e.reason or (None if crit.holds(entry_stats(e)) else "value") for e in entries]
        depth = modules = None
        if opts.by_module is not None and sum(r is not None for r in reasons) >= opts.by_module_min_changed:
            depth = auto_depth([*names_a, *only_b]) if opts.by_module == "auto" else int(opts.by_module)
            run.add_norms([(module_of(e.name, depth), e.job) for e in entries if e.job is not None], jobs)
            rows = [(e.name, r is not None, entry_stats(e)) for e, r in zip(entries, reasons, strict=True)]
            modules = roll_up(depth, rows, only_a, only_b)
        changed = [
            Change(e.name, r, _info(A, e.name), _info(B, e.name), entry_stats(e))
            for e, r in zip(entries, reasons, strict=True)
            if r is not None
        ]
        changed.sort(key=Change.severity)
        return DiffReport(
            label_a,
            label_b,
            only_a,
            only_b,
            changed,
            len(entries) - len(changed),
            opts.atol,
            opts.rtol,
            total_bytes,
            opts.max_rel_l2,
            opts.min_cosine,
            opts.ignore_ties,
            depth,
            modules,
            _skipped(A.skipped, opts.filter),
            _skipped(B.skipped, opts.filter),
        )


def check(
    ckpt: CheckpointLike,
    src: str,
    dst: str,
    transform: str | Transform | Sequence[str] | None = None,
    other: CheckpointLike | None = None,
    options: CompareOptions | None = None,
    *,
    progress: Progress | None = None,
    mapper: Mapper | None = None,
    **fields: Any,
) -> CheckReport:
    """Check that ``transform(src)`` equals ``dst`` within tolerance.

    ``src`` and ``dst`` may be module prefixes: every tensor under ``src`` is checked
    against the tensor of the same relative name under ``dst``. A pair differs when the
    shapes differ (no statistics), when the dtypes differ (values still compared, after
    upcasting), or when its values are not equal by every stated criterion, as for
    :func:`diff` (``dst`` is the reference of ``rtol``). The rules are in ``docs/compare.md``.

    Args:
        ckpt (`str`, `os.PathLike`, `Checkpoint`, `dict[str, torch.Tensor]` or `torch.nn.Module`):
            The checkpoint holding ``src`` (and ``dst``, unless ``other`` is given).
        src (`str`): a tensor name or module prefix in ``ckpt``.
        dst (`str`): a tensor name or module prefix in ``other``, or else in ``ckpt``.
        transform (`str`, `Transform` or `list[str]`, *optional*):
            Steps applied to ``src`` (``"transpose"``, ``["slice(0,0,4)", "cast(float32)"]``).
        other (same as ``ckpt``, *optional*): a second checkpoint to take ``dst`` from.
        options (`CompareOptions`, *optional*): tolerances, thresholds, device, tuning
            (``ignore_ties``, ``by_module`` and ``filter`` do not apply).
        progress, mapper: as for :func:`diff`.
        **fields: ``CompareOptions`` fields, replacing those of ``options``.

    Returns:
        `CheckReport`: ``equal``, the aggregated statistics, ``rel_l2`` and ``cosine`` of
        the pairs taken as one vector, one ``PairResult`` per pair; ``to_dict()`` is the
        ``wsurgery.check/1`` JSON object.

    Raises:
        UnknownNameError: ``src`` or a destination is not in its checkpoint.
        TransformError: the transform does not parse or does not fit a source.
        UsageError: a bad option or input type.
        InputError: an input that cannot be read.

    Example:

    ```python
    import wsurgery

    report = wsurgery.check("model.safetensors", "embed.weight", "lm_head.weight", transform="transpose")
    assert report.equal, report.to_dict()
    ```
    """
    from ..surgery import pair_names

    opts = CompareOptions.of(options, **fields)
    for name, default in (("ignore_ties", False), ("by_module", None), ("filter", None)):
        if getattr(opts, name) != default:
            raise UsageError(f"check takes no {name} (a diff option)", param=name)
    t = parse(transform)
    with _Run(opts, progress, mapper) as run:
        C, label = run.open(ckpt, "ckpt")
        D, other_label = C, None
        if other is not None:
            D, other_label = run.open(other, "other")
        run.place(C, D)
        pairs = pair_names(C, src, D, dst)
        missing = [d for _, d in pairs if d not in D]
        if missing:
            if len(pairs) == 1:
                raise lookup.unknown(D, missing[0])
            where = f" in {D.path}" if D.path else ""
            raise UnknownNameError(
                missing[0],
                path=D.path,
                message=f"{len(missing)} of {len(pairs)} destinations are missing{where}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else ""),
                hint="check the destination, or that both module prefixes hold the same tensors",
            )
        values = [(s, d, lookup.value(C, s, t), lookup.value(D, d)) for s, d in pairs]  # infer first: fails early
        jobs = {d: _Job(d, vs, vd) for s, d, vs, vd in values}
        run.compare([jobs[d] for _, d, vs, vd in values if vs.shape == vd.shape])
        crit = run.criteria
        results: list[PairResult] = []
        for s, d, vs, vd in values:
            info_s = {"dtype": vs.dtype, "shape": list(vs.shape)}
            stats = jobs[d].stats
            if vs.shape != vd.shape:
                reason: str | None = "shape"
            elif vs.dtype != vd.dtype:
                reason = "dtype"
            else:
                reason = None if crit.holds(stats) else "value"
            results.append(PairResult(s, d, reason, info_s, _info(D, d), stats))
        run.add_norms([("", r.dst) for r in results if r.stats is not None], jobs)
        rel, cosine = total([s for s in (jobs[r.dst].stats for r in results) if s is not None])
        results = [dataclasses.replace(r, stats=jobs[r.dst].stats) for r in results]
        return CheckReport(
            label, other_label, src, dst, t.specs(), results, opts.atol, opts.rtol,
            opts.max_rel_l2, opts.min_cosine, rel, cosine,
        )  # fmt: skip
