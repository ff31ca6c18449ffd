"""Surgery plans: validate the whole request first (:func:`plan`), then apply it to a new
``Checkpoint`` (:meth:`Plan.apply`). ``Checkpoint.tie/copy/untie`` are the front door.

A request is ``Request(kind, src, dst, transform)``:

- ``tie``: ``dst`` becomes an alias of ``transform(src)``, stored once. View steps only,
  and the composed chain must be a true view of the stored source (checked on shapes and
  strides, without data), so the alias stays live when loaded.
- ``copy``: ``dst`` becomes an independent stored tensor ``transform(src)``; any step. The
  source may come from a second checkpoint (``other``).
- ``untie``: the alias ``dst`` becomes a stored tensor of its own with the same value
  (``src`` is unused). A stored name unties every alias of it; a module prefix every tie
  under it.

``src`` and ``dst`` may be module prefixes (``encoder.layers.0`` maps every tensor under it).

Rules (each one enforced, with an error that names the tensors):

- A plan never touches tensor data: shapes and dtypes are inferred from the transforms,
  and every problem is collected and reported at once (``SurgeryError``, exit 4). An
  unknown source name is an ``UnknownNameError`` (exit 3).
- Aliases are followed to their stored source and the chains composed, so a result's
  aliases always name stored tensors.
- All requests read the *input*: a copy whose source is also a destination of the plan
  copies the value from before the plan. A tie whose source is replaced by the plan is
  refused (a cycle or a chain).
- A tie onto an existing name must fit it exactly (shape and dtype); a copy replaces
  whatever the name held, whatever its shape or dtype.
- A destination that does not exist yet but is one edit (or a change of case) away from
  a name that does is refused as a likely typo, unless the caller says it is new.
- A copy only ever changes the values of its destinations. A copy onto an alias unties
  that alias; a copy onto a stored tensor that other aliases point at first unties those
  aliases (each keeps its value as a tensor of its own, listed as an ``untie`` step).
- A tie onto a stored tensor that other aliases point at is refused (untie them first, or
  tie them too), as is a tie of a name onto itself, and two steps with one destination.

Applying a plan returns a new checkpoint that shares the untouched entries of the input,
so a tensor no step touches is later written as raw bytes. Copies and untied aliases are
``ComputedStored`` entries: computed one at a time on ``device`` when written, never
held together in memory; an untransformed one over a safetensors file is still copied
as raw bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import lookup
from ..devices import check_device
from ..errors import Problem, SurgeryError, TransformError, UnknownNameError, UsageError
from ..expressions import ComputedStored
from ..model import Checkpoint, Derived, Stored, natural_key
from ..selectors import is_glob, select
from ..show import shape_text
from ..transforms import Reshape, Transform, parse
from .ops import NameBudget, Op, check_new_names, dependents, derive, refuse, select_under

KINDS = ("tie", "copy", "untie")


@dataclass(frozen=True)
class Request:
    """One asked-for step: ``dst`` becomes ``transform(src)`` as a ``kind`` (for untie,
    ``dst`` names what to untie and ``src`` is None)."""

    kind: str
    src: str | None
    dst: str
    transform: Transform | Sequence[str] | str | None = None


def requests(kind: str, src: str | Sequence[str], dst: str | Sequence[str], transform=None) -> list[Request]:
    """Pair ``src`` with ``dst`` (one name each, or two lists of the same length), in order."""
    srcs = [src] if isinstance(src, str) else list(src)
    dsts = [dst] if isinstance(dst, str) else list(dst)
    if len(srcs) != len(dsts):
        raise UsageError(
            f"{len(srcs)} sources but {len(dsts)} destinations",
            param="dst",
            hint="give one destination per source, in the same order",
        )
    return [Request(kind, s, d, transform) for s, d in zip(srcs, dsts, strict=True)]


def untie_requests(ckpt: Checkpoint, names: Sequence[str] | None) -> list[Request]:
    """Untie ``names`` (every alias when empty or None)."""
    if not names:
        names = sorted(ckpt.aliases, key=natural_key)
    return [Request("untie", None, n) for n in names]


@dataclass
class Plan:
    """A validated list of steps over ``ckpt``; :meth:`apply` makes the new checkpoint."""

    ckpt: Checkpoint
    ops: list[Op]
    other: Checkpoint | None = None
    device: str = "cpu"

    def apply(self) -> Checkpoint:
        """A new checkpoint sharing the untouched entries of the input (so they are later
        written as raw bytes); copies and untied aliases are computed when written."""
        return _apply(self.ckpt, self.ops, self.other, self.device)


def _misfit(label: str, shape, dtype: str, d: str, dshape, ddtype: str, source=None) -> Problem:
    """A tie whose value does not fit the tensor it would replace. The fix offered never
    undoes what was asked: a transpose only when no transform was given and the shapes
    are mirrored, a copy for a dtype (a tie cannot cast). ``source`` is the (shape, dtype)
    of the source before the user's transform, when there is one."""
    text = f"{label}: the result is {dtype} {shape_text(shape)} but {d} is {ddtype} {shape_text(dshape)}"
    if source is not None and tuple(source[0]) == dshape and source[1] == ddtype:
        text += f" (the source itself is {ddtype} {shape_text(dshape)}: check the transform)"
    suggest: tuple[str, ...] = ()
    if source is None and dshape != tuple(shape) and len(shape) == 2 and dshape == tuple(shape)[::-1]:
        suggest = ("transpose",)
    use = None
    if ddtype != dtype:
        text += " (a tie cannot cast)"
        use = "copy"
    return Problem(text, suggest=suggest, use=use, names=(d,))


def pair_names(src_ckpt: Checkpoint, src: str, dst_ckpt: Checkpoint, dst: str) -> list[tuple[str, str]]:
    """Pair the names ``src`` selects (:mod:`wsurgery.selectors`) with names under ``dst``.

    An exact tensor name pairs with ``dst`` itself (a name that is a tensor wins over a
    module prefix of the same spelling); a module prefix maps every tensor under it to
    the same suffix under ``dst``; a glob pairs with ``dst`` when it selects one tensor.

    Raises:
        UnknownNameError: ``src`` selects nothing (with close matches).
        SurgeryError: a prefix or a glob of several tensors onto one tensor name.
    """
    found = select_under(src_ckpt, src)
    if found == [(src, "")]:
        return [(src, dst)]
    if len(found) == 1 and found[0][1] == "" and is_glob(src):
        return [(found[0][0], dst)]
    if dst in dst_ckpt and dst not in {n for n, _ in found}:
        raise SurgeryError(
            f"{src!r} is a module prefix ({len(found)} tensors) but {dst!r} is a single tensor",
            hint="name a module prefix as the destination",
        )
    base = dst.rstrip(".")
    return [(name, f"{base}.{suffix}" if base else suffix) for name, suffix in found]


class _Prefixes:
    """Whether a name is a module prefix of ``ckpt`` (``encoder`` of ``encoder.w``): every
    prefix of every name, gathered once per plan, so a copy of a prefix of n tensors takes
    time linear in the names, not n sorts of them."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.known: set[str] | None = None

    def __contains__(self, name: str) -> bool:
        if self.known is None:
            self.known = set()
            for n in (*self.ckpt.stored, *self.ckpt.aliases):
                at = n.find(".")
                while at >= 0:
                    self.known.add(n[:at])
                    at = n.find(".", at + 1)
        return name in self.known


def _needs_stride_check(transform: Transform) -> bool:
    """A reshape after a step that may break contiguity is a view only for some strides."""
    moved = False
    for step in transform.steps:
        if isinstance(step, Reshape) and moved:
            return True
        if not isinstance(step, Reshape):
            moved = True
    return False


def _view_problem(stored: Stored, transform: Transform) -> str | None:
    """Why ``transform`` is no view of the (contiguous) stored tensor, or None.

    Checked on a ``meta`` tensor: shapes and strides only, no data (and torch is imported
    only for chains that reshape after a transpose, permute or slice).
    """
    if not _needs_stride_check(transform):
        return None
    import torch

    from ..dtypes import torch_dtype

    meta = torch.empty(stored.shape, dtype=torch_dtype(stored.dtype), device="meta")
    try:
        transform.apply(meta, allow_copy=False)
    except TransformError as exc:
        return str(exc)
    return None


# --- planning ---------------------------------------------------------------------------


def plan(
    ckpt: Checkpoint, reqs: Sequence[Request], other: Checkpoint | None = None, *, device="cpu", new: bool = False
) -> Plan:
    """Validate ``reqs`` as one plan over ``ckpt``: every problem is collected and raised
    together (``SurgeryError``); nothing is read.

    Copies take their source from ``other`` when it is given. ``device`` is where copies
    and untied aliases are computed when the result is written or read. A destination
    that does not exist yet but is one edit away from a name that does is refused as a
    likely typo, unless ``new``.
    """
    problems: list[Problem | str] = []
    ops: list[Op] = []
    budget = NameBudget(ckpt, other)
    prefixes = _Prefixes(ckpt)
    count = chars = 0
    for req in reqs:
        kind, src, dst, spec = req.kind, req.src, req.dst, req.transform
        if kind == "untie":
            ops.extend(_untie_ops(ckpt, dst, problems))
            continue
        if kind not in KINDS:
            raise SurgeryError(f"unknown surgery step {kind!r}", hint=f"use one of {', '.join(KINDS)}")
        try:
            user_t = spec if isinstance(spec, Transform) else parse(spec or [])
        except TransformError as exc:
            problems.append(f"{kind} {src} -> {dst}: {exc}")
            continue
        why_not = user_t.tie_problem() if kind == "tie" else None
        if why_not is not None:
            problems.append(Problem(f"tie {src} -> {dst}: {why_not}", use="copy", names=(dst,)))
            continue
        from_other = kind == "copy" and other is not None
        source_ckpt = other if other is not None and kind == "copy" else ckpt
        assert src is not None  # only an untie has no source
        try:
            pairs = pair_names(source_ckpt, src, ckpt, dst)
        except UnknownNameError:
            raise
        except SurgeryError as exc:
            problems.append(f"{kind} {src} -> {dst}: {exc}")
            continue
        # every pair is a name in the result: counted before any is made (a prefix of n
        # tensors copied to k destinations makes n * k names)
        fresh = [d for _, d in pairs if d not in ckpt]
        count, chars = count + len(fresh), chars + sum(map(len, fresh))
        what = f"{src} -> {dst} ({len(pairs):,} names, {count:,} new in this plan)"
        budget.made(
            kind, what, len(ckpt) + count, budget.chars + chars, 0
        )  # names given, or a given prefix + an input name
        for s, d in pairs:
            op = _pair_op(kind, s, d, user_t, source_ckpt, ckpt, from_other, prefixes, problems)
            if op is not None:
                ops.append(op)
    ops = _dedupe_unties(ops)
    if not new:
        check_new_names(ckpt, [op.dst for op in ops if op.kind != "untie"], "destination", problems)
    if not problems:
        ops = ops + _implied_unties(ckpt, ops)
        problems.extend(_conflicts(ckpt, ops))
    refuse(problems)
    check_device(device)
    return Plan(ckpt, ops, other, device)


def _pair_op(
    kind: str,
    s: str,
    d: str,
    user_t: Transform,
    source_ckpt: Checkpoint,
    ckpt: Checkpoint,
    from_other: bool,
    prefixes: _Prefixes,
    problems: list[Problem | str],
) -> Op | None:
    """One (source name, destination name) pair checked into an ``Op``, or None with problems."""
    first = lookup.value(source_ckpt, s)
    base, t, stored = first.source, first.transform.then(user_t), first.base
    where = f" of {source_ckpt.path}" if from_other and source_ckpt.path else ""
    label = f"{kind} {s}{where} -> {d}"
    if not d or d.startswith(".") or d.endswith("."):
        problems.append(f"{label}: {d!r} is not a tensor name (empty, or starting or ending with a dot)")
        return None
    try:
        shape, dtype = t.infer(stored.shape, stored.dtype)
    except TransformError as exc:
        via = f" (an alias of {base}, {t})" if base != s else ""
        problems.append(f"{kind} {s}{where} {stored.dtype} {shape_text(stored.shape)}{via} -> {d}: {exc}")
        return None
    value = Derived(stored, t, tuple(shape), dtype)
    if kind == "tie":
        why = _view_problem(stored, t)
        if why is not None:
            problems.append(
                f"{label}: the chain '{t}' from the stored {base} {shape_text(stored.shape)} is not a view ({why}); "
                "a tie must stay a view of its source, so copy instead or reshape before transposing or slicing"
            )
            return None
    replaces = d in ckpt
    note = ""
    if replaces:
        dshape, ddtype = lookup.shape_dtype(ckpt, d)
        if kind == "tie" and (tuple(dshape) != value.shape or ddtype != dtype):
            own = None if user_t.is_identity else lookup.shape_dtype(source_ckpt, s)
            problems.append(_misfit(label, value.shape, dtype, d, tuple(dshape), ddtype, source=own))
            return None
        if (tuple(dshape), ddtype) != (value.shape, dtype):
            note = f"was {ddtype} {shape_text(dshape)}"
        if d in ckpt.aliases:
            a = ckpt.aliases[d]
            was = f"was an alias of {a.source}" + (f" ({a.transform})" if not a.transform.is_identity else "")
            note = f"{was}, {note.removeprefix('was ')}" if note else was
    elif d in prefixes:
        problems.append(f"{label}: {d} is a module prefix in {ckpt.path or 'the checkpoint'}, not a tensor name")
        return None
    origin = (source_ckpt.path or "<other>") if from_other else None
    return Op(kind, s, d, value, replaces, origin=origin, note=note)


def _untie_op(ckpt: Checkpoint, name: str, note: str = "") -> Op:
    a = ckpt.aliases[name]
    return Op("untie", a.source, name, a, True, note=note)


def _untie_ops(ckpt: Checkpoint, name: str, problems: list[Problem | str]) -> list[Op]:
    """Untie what the selector ``name`` selects: an alias; every alias of a stored tensor;
    every tie under a module prefix or among a glob's names."""
    found = select(ckpt.names(), name, path=ckpt.path)  # UnknownNameError (exit 3) for an unknown name
    targets: list[tuple[str, str]] = []
    for n in found:
        if n in ckpt.aliases:
            targets.append((n, ""))
        else:
            targets.extend((a, f"tied to {n}") for a in dependents(ckpt, n))
    if not targets:
        if found == [name]:
            problems.append(f"untie {name}: {name} is a stored tensor and no alias points at it; nothing to untie")
        else:
            prefixed = found[0].startswith(name.rstrip(".") + ".")
            what = "under the module prefix" if prefixed or not is_glob(name) else "among the names of the glob"
            problems.append(f"untie {name}: no tensor {what} {name!r} is tied; nothing to untie")
    return [_untie_op(ckpt, n, note) for n, note in targets]


def _dedupe_unties(ops: list[Op]) -> list[Op]:
    """Untying one alias twice (named twice, or by a prefix and a name) is one step."""
    seen: set[str] = set()
    out = []
    for op in ops:
        if op.kind == "untie":
            if op.dst in seen:
                continue
            seen.add(op.dst)
        out.append(op)
    return out


def _implied_unties(ckpt: Checkpoint, ops: list[Op]) -> list[Op]:
    """Aliases of a stored tensor that a copy overwrites keep their value as tensors of their own."""
    dsts = {op.dst for op in ops}
    out = []
    for op in ops:
        if op.kind != "copy" or op.dst not in ckpt.stored:
            continue
        for a in dependents(ckpt, op.dst):
            if a not in dsts:
                dsts.add(a)
                out.append(_untie_op(ckpt, a, note=f"keeps its value ({op.dst} is overwritten)"))
    return out


def _conflicts(ckpt: Checkpoint, ops: list[Op]) -> list[Problem | str]:
    problems: list[Problem | str] = []
    seen: dict[str, Op] = {}
    for op in ops:
        if op.dst in seen:
            first = seen[op.dst]
            problems.append(
                f"{op.dst} is the destination of two steps ({first.kind} from {first.src} and {op.kind} from {op.src})"
            )
        seen[op.dst] = op
    dsts = set(seen)
    for op in ops:
        if op.kind != "tie":
            continue
        if op.base == op.dst:
            problems.append(f"tie {op.src} -> {op.dst} would make {op.dst} an alias of itself (a cycle)")
            continue
        if op.base in dsts:
            problems.append(
                f"tie {op.src} -> {op.dst}: its source {op.base} is itself replaced by this plan (a cycle or chain)"
            )
            continue
        if op.dst in ckpt.stored:
            tied = [n for n in dependents(ckpt, op.dst) if n not in dsts]
            if tied:
                problems.append(
                    Problem(
                        f"tie {op.src} -> {op.dst}: {op.dst} is the stored source of {', '.join(tied)}; "
                        "untie those first or tie them too",
                        use="untie",
                        names=(op.dst, *tied),
                    )
                )
    return problems


def _apply(ckpt: Checkpoint, ops: list[Op], other: Checkpoint | None, device) -> Checkpoint:
    stored = dict(ckpt.stored)
    aliases = dict(ckpt.aliases)
    for op in ops:
        stored.pop(op.dst, None)
        aliases.pop(op.dst, None)
    for op in ops:
        value = op.value
        assert isinstance(value, Derived)  # a tie, copy or untie is planned over one stored tensor
        if op.kind == "tie":
            aliases[op.dst] = value
        else:
            stored[op.dst] = ComputedStored(op.dst, value.base, value.transform, device=device)
    return derive(ckpt, stored, aliases, ops, other=other)


def verify_ties(ckpt: Checkpoint, src, dst, transform=None, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    """Refuse (``SurgeryError``) unless every ``dst`` already holds ``transform(src)``: a tie
    replaces the destination's values, and this proves none is lost.

    Equality is ``torch.isclose``'s: ``|a - b| <= atol + rtol * |b|`` elementwise, NaN
    equal to NaN at the same place, an infinity equal only to itself; integers and bools
    exactly. Shapes and dtypes must match. Tensors are compared a slab of rows at a time.
    """
    problems: list[Problem | str] = []
    for req in requests("tie", src, dst, transform):
        pairs = pair_names(ckpt, req.src or "", ckpt, req.dst)
        missing = [d for _, d in pairs if d not in ckpt]
        if missing:
            problems.append(Problem(f"tie {req.src} -> {req.dst}: nothing to verify, {', '.join(missing)} is new"))
            continue
        user_t = req.transform if isinstance(req.transform, Transform) else parse(req.transform or [])
        for s, d in pairs:
            detail = _differs(ckpt, s, d, user_t, atol, rtol)
            if detail is not None:
                problems.append(
                    Problem(f"tie {s} -> {d}: the values differ ({detail}; atol {atol:g}, rtol {rtol:g})", names=(d,))
                )
    refuse(problems)


_SLAB_ELEMENTS = 1 << 24  # elements compared at a time


def _differs(ckpt: Checkpoint, s: str, d: str, user_t: Transform, atol: float, rtol: float) -> str | None:
    """How ``user_t(s)`` differs from ``d`` (None when it does not), by ``isclose``."""
    import torch

    a = user_t.apply(ckpt.get_tensor(s))
    b = ckpt.get_tensor(d)
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return f"{s} gives {a.dtype} {shape_text(tuple(a.shape))}, {d} is {b.dtype} {shape_text(tuple(b.shape))}"
    numel = a.numel()
    if numel == 0:
        return None
    a, b = a.reshape(-1), b.reshape(-1)
    mismatched, worst = 0, 0.0
    for start in range(0, numel, _SLAB_ELEMENTS):
        x, y = a[start : start + _SLAB_ELEMENTS], b[start : start + _SLAB_ELEMENTS]
        if x.is_floating_point() or x.is_complex():
            x64, y64 = x.to(torch.float64), y.to(torch.float64)
            close = torch.isclose(x64, y64, rtol=rtol, atol=atol, equal_nan=True)
            diff = (x64 - y64).abs()[~close]
            if diff.numel():
                finite = diff[torch.isfinite(diff)]
                worst = max(worst, float("inf") if finite.numel() < diff.numel() else float(finite.max()))
        else:
            close = x == y
        mismatched += int((~close).sum())
    if not mismatched:
        return None
    return f"{mismatched:,} of {numel:,} elements differ, max |a-b| {worst:.3g}"
