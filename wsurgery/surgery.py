"""Surgery plans: validate the whole plan first, then apply it to a new ``Checkpoint``.

A plan never touches tensor data: shapes and dtypes are inferred from the transforms,
and every problem is collected and reported at once (``SurgeryError``, exit 4). Applying
a plan returns a new checkpoint that shares the untouched entries of the input, so a
tensor no step touches is later written as raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checkpoint import Alias, Checkpoint, ComputedStored, Stored, make_alias, natural_key
from .errors import SurgeryError, TransformError, UnknownNameError
from .transforms import Transform, parse


@dataclass(frozen=True)
class Op:
    """One planned step: ``dst`` becomes ``transform(src)`` as a tie or an independent copy."""

    kind: str  # "tie" | "copy" | "untie"
    src: str  # the name the user addressed
    dst: str
    base: str  # the stored tensor the value comes from (after following aliases)
    transform: Transform  # from base to dst (composed with the alias chain)
    shape: tuple[int, ...]
    dtype: str
    replaces: bool  # dst existed before

    def describe(self) -> dict:
        return {
            "op": self.kind,
            "src": self.src,
            "dst": self.dst,
            "source": self.base,
            "transform": self.transform.specs(),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "replaces": self.replaces,
        }


@dataclass
class Plan:
    ops: list[Op]
    result: Checkpoint
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        r = self.result
        return {
            "stored": len(r.stored),
            "aliases": [{"name": n, **r.aliases[n].record()} for n in sorted(r.aliases, key=natural_key)],
            "copied": [
                {"src": op.src, "dst": op.dst, "transform": op.transform.specs()}
                for op in self.ops
                if op.kind == "copy"
            ],
            "plan": [op.describe() for op in self.ops],
        }


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def pair_names(src_ckpt: Checkpoint, src: str, dst_ckpt: Checkpoint, dst: str) -> list[tuple[str, str]]:
    """Pair ``src`` with ``dst``: one tensor with one name, or a module prefix with a prefix.

    A name that is a tensor wins over a module prefix of the same spelling. Unknown
    names raise ``UnknownNameError`` (exit 3) with close matches.
    """
    found = src_ckpt.resolve(src)
    if len(found) == 1 and found[0][1] == "" and found[0][0] == src:
        return [(src, dst)]
    if dst in dst_ckpt and dst not in {n for n, _ in found}:
        raise SurgeryError(
            f"{src!r} is a module prefix ({len(found)} tensors) but {dst!r} is a single tensor",
            hint="name a module prefix as the destination",
        )
    base = dst.rstrip(".")
    return [(name, f"{base}.{suffix}" if base else suffix) for name, suffix in found]


def _source_of(ckpt: Checkpoint, name: str, transform: Transform) -> tuple[str, Transform]:
    """Follow an alias to its stored source, composing the transforms."""
    if name in ckpt.aliases:
        a = ckpt.aliases[name]
        return a.source, a.transform.then(transform)
    return name, transform


def _infer(stored: Stored, transform: Transform, label: str, problems: list[str]):
    try:
        shape, dtype = transform.infer(stored.shape, stored.dtype)
        return tuple(shape), dtype
    except TransformError as exc:
        problems.append(f"{label}: {exc}")
        return None


def plan_tie(ckpt: Checkpoint, src: str, dst: str, transform=None) -> Plan:
    """Make ``dst`` an alias of ``transform(src)``; ``src``/``dst`` may be module prefixes."""
    return plan(ckpt, [("tie", src, dst, transform)])


def plan(ckpt: Checkpoint, requests, other: Checkpoint | None = None) -> Plan:
    """Validate and apply a list of ``(kind, src, dst, transform specs)`` requests.

    ``kind`` is ``"tie"`` or ``"copy"``; copies may take their source from ``other``.
    """
    problems: list[str] = []
    ops: list[Op] = []
    for kind, src, dst, spec in requests:
        try:
            user_t = spec if isinstance(spec, Transform) else parse(spec or [])
        except TransformError as exc:
            problems.append(str(exc))
            continue
        source_ckpt = other if (kind == "copy" and other is not None) else ckpt
        if kind == "tie" and not user_t.is_view:
            bad = [s for s in user_t.steps if not s.is_view]
            problems.append(
                f"tie {src} -> {dst}: a tie takes view steps only (same, transpose, permute, reshape, slice); "
                f"{', '.join(s.spec() for s in bad)} would need a copy (use `wsurgery copy`)"
            )
            continue
        try:
            pairs = pair_names(source_ckpt, src, ckpt, dst)
        except UnknownNameError:
            raise
        except SurgeryError as exc:
            problems.append(str(exc))
            continue
        for s, d in pairs:
            base, t = _source_of(source_ckpt, s, user_t)
            stored = source_ckpt.stored[base]
            label = f"{kind} {s} -> {d}"
            inferred = _infer(stored, t, label, problems)
            if inferred is None:
                continue
            shape, dtype = inferred
            replaces = d in ckpt
            if replaces:
                dshape, ddtype = ckpt.shape_dtype(d)
                if tuple(dshape) != shape or ddtype != dtype:
                    problems.append(
                        f"{label}: the result is {dtype} {_fmt_shape(shape)} but {d} is {ddtype} {_fmt_shape(dshape)}"
                        + (" (try --transform transpose)" if tuple(dshape) == shape[::-1] and len(shape) == 2 else "")
                    )
                    continue
            ops.append(Op(kind, s, d, base, t, shape, dtype, replaces))
    if not problems:
        problems.extend(_conflicts(ckpt, ops, other))
    if problems:
        head = f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the plan: " if len(problems) > 1 else ""
        raise SurgeryError(head + "; ".join(problems), hint="nothing was written")
    return Plan(ops=ops, result=_apply(ckpt, ops, other))


def _conflicts(ckpt: Checkpoint, ops: list[Op], other: Checkpoint | None) -> list[str]:
    problems = []
    seen: dict[str, Op] = {}
    for op in ops:
        if op.dst in seen:
            problems.append(f"{op.dst} is the destination of two steps ({seen[op.dst].src} and {op.src})")
        seen[op.dst] = op
    dsts = set(seen)
    for op in ops:
        from_other = op.kind == "copy" and other is not None
        if not from_other and op.base in dsts and op.kind == "tie":
            if op.base == op.dst:
                problems.append(f"tie {op.src} -> {op.dst} would make {op.dst} an alias of itself (a cycle)")
            else:
                problems.append(
                    f"tie {op.src} -> {op.dst}: its source {op.base} is itself replaced by this plan (a cycle or chain)"
                )
        if op.kind == "tie" and op.dst in ckpt.stored:
            dependents = sorted(
                (n for n, a in ckpt.aliases.items() if a.source == op.dst and n not in dsts), key=natural_key
            )
            if dependents:
                problems.append(
                    f"tie {op.src} -> {op.dst}: {op.dst} is the stored source of {', '.join(dependents)}; "
                    "untie those first or tie them too"
                )
    return problems


def _apply(ckpt: Checkpoint, ops: list[Op], other: Checkpoint | None) -> Checkpoint:
    stored = dict(ckpt.stored)
    aliases = dict(ckpt.aliases)
    for op in ops:
        stored.pop(op.dst, None)
        aliases.pop(op.dst, None)
    for op in ops:
        if op.kind == "tie":
            aliases[op.dst] = make_alias(op.dst, op.base, op.transform, stored[op.base])
        else:
            source_ckpt = other if other is not None else ckpt
            base = source_ckpt.stored[op.base]
            if op.transform.is_identity:
                stored[op.dst] = base.renamed(op.dst)
            else:
                stored[op.dst] = ComputedStored(op.dst, base, op.transform)
    result = Checkpoint(
        stored=stored,
        aliases=aliases,
        metadata=dict(ckpt.metadata),
        path=ckpt.path,
        format=ckpt.format,
        skipped=list(ckpt.skipped),
        container=ckpt.container,
        input_files=list(ckpt.input_files) + (list(other.input_files) if other is not None else []),
    )
    result.check_invariants()
    return result


def alias_entry(result: Checkpoint, name: str) -> Alias:
    return result.aliases[name]
