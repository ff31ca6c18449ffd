"""``merge``: several checkpoints of one architecture combined tensor by tensor (DESIGN.md
"Merges"): mean, task arithmetic, TIES and SLERP, lazily.

Nothing is read here: the result's floating tensors are :class:`~wsurgery.merging.MergedStored`
values that compute themselves when written, one tensor per input in memory. Every problem
with the inputs (names missing from some, shapes that differ, a floating tensor that is
not floating elsewhere) is refused at once, before anything is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from .. import dtypes, lookup
from ..errors import Problem, UsageError
from ..expressions import ComputedStored
from ..merging import METHODS, NEEDS_BASE, CarriedStored, MergedStored, MergeSpec
from ..model import Checkpoint, Derived, Stored, natural_key
from .ops import Op, refuse

PathOrCheckpoint = str | os.PathLike | Checkpoint


def _is_float(dtype: str) -> bool:
    return dtypes.BY_NAME[dtype].kind == "float"


def merge_spec(
    n_inputs: int,
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    has_base: bool = False,
    density: float | None = None,
    t: float | None = None,
) -> MergeSpec:
    """Check a merge's parameters (``UsageError`` naming the parameter) and return them as
    a :class:`~wsurgery.merging.MergeSpec`. Checked before any input is opened."""
    method = str(method).lower().replace("_", "-")
    if method == "linear":  # mergekit's name for it
        method = "mean"
    if method not in METHODS:
        raise UsageError(f"unknown merge method {method!r}; the methods are {', '.join(METHODS)}", param="method")
    least = 2 if method in ("mean", "slerp") else 1
    if n_inputs < least:
        raise UsageError(f"{method} merges at least {least} checkpoints, got {n_inputs}", param="checkpoints")
    if method == "slerp" and n_inputs != 2:
        raise UsageError(f"slerp interpolates between exactly two checkpoints, got {n_inputs}", param="checkpoints")
    if weights is None:
        w = (1.0,) * n_inputs
    else:
        try:
            w = tuple(float(x) for x in weights)
        except (TypeError, ValueError):
            raise UsageError(f"weights must be numbers, got {list(weights)!r}", param="weights") from None
        if len(w) != n_inputs:
            raise UsageError(f"{len(w)} weights for {n_inputs} checkpoints: give one weight each", param="weights")
        if not all(math.isfinite(x) for x in w):
            raise UsageError(f"weights must be finite numbers, got {list(w)}", param="weights")
    if method == "slerp" and weights is not None:
        raise UsageError("slerp takes t, not weights", param="weights")
    if method == "mean" and math.fsum(w) == 0:
        raise UsageError(f"the weights {list(w)} sum to zero: a mean divides by their sum", param="weights")
    if method in NEEDS_BASE and not has_base:
        raise UsageError(f"{method} needs a base checkpoint (the task vectors are x - base)", param="base")
    if method not in NEEDS_BASE and has_base:
        raise UsageError(f"{method} takes no base checkpoint", param="base")
    if density is not None and method != "ties":
        raise UsageError(f"density is a parameter of ties, not of {method}", param="density")
    if t is not None and method != "slerp":
        raise UsageError(f"t is a parameter of slerp, not of {method}", param="t")
    d = 1.0 if density is None else float(density)
    if not (0.0 < d <= 1.0):
        raise UsageError(f"density must be in (0, 1], got {density}", param="density")
    tt = 0.5 if t is None else float(t)
    if not (0.0 <= tt <= 1.0):
        raise UsageError(f"t must be in [0, 1], got {t}", param="t")
    return MergeSpec(method, w, d, tt)


def _value_as_stored(ckpt: Checkpoint, name: str, device) -> Stored:
    """``name``'s value in ``ckpt`` as a stored tensor (an alias computed from its source)."""
    e = lookup.entry(ckpt, name)
    if isinstance(e, Derived):
        return e.base if e.transform.is_identity else ComputedStored(name, e.base, e.transform, device)
    return e


def _same_tie(ckpts: Sequence[Checkpoint], name: str) -> bool:
    first = ckpts[0].aliases.get(name)
    if first is None:
        return False
    for c in ckpts[1:]:
        a = c.aliases.get(name)
        if a is None or a.source != first.source or a.specs != first.specs:
            return False
    return True


def merge(
    checkpoints: Sequence[PathOrCheckpoint],
    *,
    method: str = "mean",
    weights: Sequence[float] | None = None,
    base: PathOrCheckpoint | None = None,
    density: float | None = None,
    t: float | None = None,
    only: Sequence[str] | str | None = None,
    dtype: str | None = None,
    device="cpu",
) -> Checkpoint:
    """Merge checkpoints of one architecture, tensor by tensor (lazy: nothing is read
    until the result is written or read).

    Every floating tensor is computed in float64 and rounded once to ``dtype`` (by
    default the first input's dtype for that tensor). Non-floating tensors must be equal
    in every input and are carried from the first. A tie that every input (and the base)
    stores the same way stays a tie; otherwise it is merged as values, with a note.

    Args:
        checkpoints: paths or opened checkpoints (any format wsurgery reads).
        method: ``mean`` (sum(w x) / sum(w)), ``task-arithmetic`` (B + sum w (x - B)),
            ``ties`` (mergekit's TIES) or ``slerp`` (two inputs).
        weights: one per checkpoint (default 1 each).
        base: the base checkpoint B of ``task-arithmetic`` and ``ties``.
        density: for ``ties``, the fraction of each task vector kept, in (0, 1].
        t: for ``slerp``, in [0, 1] (0 gives the first checkpoint; default 0.5).
        only: selectors (names, module prefixes, globs): merge these, carry the rest
            from the first checkpoint.
        dtype: the output's floating dtype.
        device: where the arithmetic runs (``"cpu"``, ``"cuda"``).

    Returns:
        A lazy :class:`~wsurgery.Checkpoint` with the first input's metadata and folder.

    Raises:
        UsageError: a bad method or parameter (named by ``param``).
        SurgeryError: names missing from some input, shapes or kinds that differ.

    Example:
        >>> wsurgery.merge(["ft1/", "ft2/"], method="ties", base="base/", density=0.5).save("merged/")  # doctest: +SKIP
    """
    from ..io.registry import open as load

    if isinstance(checkpoints, (str, os.PathLike, Checkpoint)):
        checkpoints = [checkpoints]
    spec = merge_spec(len(checkpoints), method=method, weights=weights, has_base=base is not None, density=density, t=t)
    if dtype is not None:
        entry = dtypes.lookup(str(dtype))
        if entry is None or entry.kind != "float":
            raise UsageError(f"{dtype!r} is not a floating dtype", param="dtype")
        dtype = entry.name
    if isinstance(only, str):
        only = [only]
    ckpts = [c if isinstance(c, Checkpoint) else load(c) for c in checkpoints]
    b = None if base is None else (base if isinstance(base, Checkpoint) else load(base))
    return merge_checkpoints(ckpts, spec, base=b, only=only, dtype=dtype, device=device)


def _label(c: Checkpoint, i: int) -> str:
    return c.path or f"input {i + 1}"


def merge_checkpoints(
    ckpts: Sequence[Checkpoint],
    spec: MergeSpec,
    *,
    base: Checkpoint | None = None,
    only: Sequence[str] | None = None,
    dtype: str | None = None,
    device="cpu",
) -> Checkpoint:
    """:func:`merge` over opened checkpoints and checked parameters."""
    from ..selectors import select_all

    first = ckpts[0]
    names = first.names()
    chosen = names if not only else select_all(names, list(only), path=first.path)
    every = [*ckpts, *([base] if base is not None else [])]
    labels = [_label(c, i) for i, c in enumerate(ckpts)] + (["the base"] if base is not None else [])
    problems: list[Problem | str] = []
    for c, label in zip(every[1:], labels[1:], strict=True):
        missing = [n for n in chosen if n not in c]
        if missing:
            shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            problems.append(
                Problem(f"merge: {label} lacks {len(missing)} of the merged names: {shown}", names=tuple(missing))
            )
    if not only:
        for c, label in zip(every[1:], labels[1:], strict=True):
            extra = sorted(set(c.names()) - set(names), key=natural_key)
            if extra:
                shown = ", ".join(extra[:20]) + (f" and {len(extra) - 20} more" if len(extra) > 20 else "")
                problems.append(
                    Problem(
                        f"merge: {label} holds {len(extra)} names the first input lacks: {shown}", names=tuple(extra)
                    )
                )
    refuse(problems)
    for n in chosen:
        shape, dt = lookup.shape_dtype(first, n)
        for c, label in zip(every[1:], labels[1:], strict=True):
            s2, d2 = lookup.shape_dtype(c, n)
            if tuple(s2) != tuple(shape):
                problems.append(
                    Problem(f"merge: {n} has shape {list(shape)} in {labels[0]} but {list(s2)} in {label}", names=(n,))
                )
            elif _is_float(d2) != _is_float(dt):
                problems.append(Problem(f"merge: {n} is {dt} in {labels[0]} but {d2} in {label}", names=(n,)))
    refuse(problems)

    chosen_set = set(chosen)
    stored: dict[str, Stored] = {}
    aliases: dict[str, Derived] = {}
    ops: list[Op] = []
    # Ties every input keeps alike follow their merged source; the others become values.
    kept_ties = {
        n for n in first.aliases if n in chosen_set and _same_tie(every, n) and first.aliases[n].source in chosen_set
    }
    for n in names:
        if n not in chosen_set:
            continue
        if n in kept_ties:
            continue
        values = [_value_as_stored(c, n, device) for c in ckpts]
        b = None if base is None else _value_as_stored(base, n, device)
        dt = lookup.shape_dtype(first, n)[1]
        note = ""
        if n in first.aliases or any(n in c.aliases for c in every[1:]):
            note = "a tie the inputs do not all store alike: written as values"
        if _is_float(dt):
            value: Stored = MergedStored(n, values, spec, base=b, dtype=dtype or dt, device=device)
        else:
            value = CarriedStored(n, values, device=device)
        stored[n] = value
        ops.append(Op("merge", n, n, value, replaces=True, note=note))
    for n, s in first.stored.items():
        if n not in chosen_set:
            stored[n] = s  # carried from the first input as it is
    for n, a in first.aliases.items():
        if n in kept_ties or (n not in chosen_set and a.source not in chosen_set):
            src = stored[a.source]
            aliases[n] = a if src is a.base else Derived.of(src, a.transform)
        elif n not in chosen_set:  # carried, but its source was merged: it keeps its own value
            value = _value_as_stored(first, n, device)
            stored[n] = value if value.name == n else value.renamed(n)
            ops.append(Op("merge", n, n, stored[n], note="a tie left out of the merge: carried as values"))
    ordered = {n: stored[n] for n in sorted(stored, key=natural_key)}
    files = list(dict.fromkeys(f for c in every for f in c.input_files))
    return first.evolve(
        stored=ordered,
        aliases=aliases,
        input_files=files,
        changes=[*first.changes, *ops],
        metadata=dict(first.metadata),
    )
