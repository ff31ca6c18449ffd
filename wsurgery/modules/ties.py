"""Ties between live modules: :func:`tie_weights`, :func:`untie_weights`,
:func:`tied_weights` (the invariants are in the package docstring). A tie takes view
steps only: the rule is :meth:`wsurgery.transforms.Transform.tie_problem`, the one that
file ties use too."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SurgeryError, TransformError
from ..transforms import IDENTITY, Transform
from ..transforms import parse as parse_transform
from .slots import (
    _PARAM,
    _PARAMETRIZED,
    _TIE,
    TiedView,
    _as_transform,
    _describe,
    _dtype,
    _param,
    _raise_problems,
    _require_module,
    _same_storage,
    _shape,
    _Slot,
    _slots,
    _unknown,
    plist_of,
)

# ----------------------------------------------------------------------------- ties


def _install_tie(
    slot_owner: nn.Module, attr: str, source: nn.Parameter, transform: Transform, source_name: str
) -> None:
    """Tie ``owner.<attr>`` (a plain Parameter now) to ``transform(source)``."""
    current = _param(slot_owner, attr)
    view = TiedView(transform, source_name, _shape(current))
    # unsafe=True: the parametrization maps the *source's* shape to the alias's, so torch's
    # registration check (forward(current) keeps current's shape) does not apply. Our own
    # checks ran before (see tie_weights) and run after (_check_tie).
    parametrize.register_parametrization(slot_owner, attr, view, unsafe=True)
    # Invariant 2: the source Parameter itself becomes ``original``; the alias's old
    # Parameter is dropped untouched (torch only ever ``set_``s it to itself).
    plist_of(slot_owner, attr).register_parameter("original", source)
    _check_tie(slot_owner, attr, attr)


def _check_tie(owner: nn.Module, attr: str, name: str) -> None:
    """Enforce the invariants of a tied view (module docstring); raise printing both values."""
    plist = plist_of(owner, attr)
    if len(plist) != 1 or not isinstance(plist[0], TiedView):
        raise SurgeryError(
            f"tied weight {name!r} is broken: expected exactly one TiedView parametrization.\n"
            f"expected: [TiedView]\nfound: [{', '.join(type(p).__name__ for p in plist)}]",
            hint="untie_weights() before adding parametrizations to a tied weight",
        )
    view: TiedView = plist[0]
    original = plist.original
    if not isinstance(original, nn.Parameter):
        raise SurgeryError(
            f"tied weight {name!r} is broken: its source must be a Parameter.\n"
            f"expected: Parameter\nfound: {type(original).__name__}"
        )
    with torch.no_grad():
        out = view(original)
    if original.device.type != "meta" and not _same_storage(out, original):
        raise SurgeryError(
            f"tied weight {name!r} is broken: it is not a view of its source {view.source!r}.\n"
            f"source storage: {original.untyped_storage().data_ptr():#x}\n"
            f"tied storage: {out.untyped_storage().data_ptr():#x}"
        )


@dataclass
class _TiePlan:
    slot: _Slot
    source_name: str
    root: nn.Parameter
    transform: Transform  # from the root


def _parse_entry(name: str, entry: Any) -> tuple[str, Any]:
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str):
        return entry[0], entry[1]
    raise SurgeryError(
        f"the map entry for {name!r} must be (other_name, transform), got {entry!r}",
        hint="e.g. {'head.weight': ('embedding.weight', WeightShareTransform.TRANSPOSE)}",
    )


def tie_weights(
    module: nn.Module,
    other: nn.Module,
    weight_names: Iterable[str] | str | None = None,
    name2name_and_transform: Mapping[str, Any] | None = None,
) -> None:
    """Tie ``module``'s named weights to ``other``'s: one value, one gradient.

    ``weight_names`` are names in ``module`` (``None``: the keys of the map).
    ``name2name_and_transform`` maps such a name to ``(other_name, transform)``; a name it
    does not hold is tied to the same name in ``other``. ``transform`` is a
    ``WeightShareTransform``, a spec string (``"transpose"``, ``"slice(0,0,128)"``), a list
    of specs, or a ``Transform``; it maps ``other``'s weight to ``module``'s. ``other`` may
    be ``module`` itself (a tie inside one model).

    SAME makes ``module``'s attribute the very Parameter of ``other``; a view transform
    registers a :class:`TiedView` parametrization over that Parameter (see the module
    docstring). Tying to a weight that is itself tied ties to its root, composing the
    transforms; tying again to the same source is a no-op; a tied weight may be re-tied.

    The whole call is checked before anything changes: unknown names, map entries for
    names not in ``weight_names``, non-view transforms, shape / dtype / device misfits
    (naming both weights and both shapes), foreign parametrizations, cycles, and
    conflicts (a weight whose tensor other weights of ``module`` are tied to, unless
    they are re-tied in the same call) are reported together in one error.
    """
    unknown: list[str] = []
    misfit: list[str] = []
    plans = _plan_ties(module, other, weight_names, name2name_and_transform, unknown, misfit)
    _raise_problems(f"cannot tie weights of {_describe(module)} to {_describe(other)}", unknown, misfit)
    for plan in plans:
        _apply_tie(plan.slot.owner, plan.slot.attr, plan.root, plan.transform, plan.source_name)


def _plan_ties(
    module: nn.Module,
    other: nn.Module,
    weight_names: Iterable[str] | str | None,
    name2name_and_transform: Mapping[str, Any] | None,
    unknown: list[str],
    misfit: list[str],
) -> list[_TiePlan]:
    """Check a tie_weights call against the modules as they are; collect its problems."""
    _require_module(module)
    _require_module(other)
    mapping = dict(name2name_and_transform or {})
    if weight_names is None:
        names = list(mapping)
    elif isinstance(weight_names, str):
        names = [weight_names]
    else:
        names = list(dict.fromkeys(weight_names))
    mod_slots = _slots(module)
    oth_slots = mod_slots if other is module else _slots(other)
    where_mod, where_oth = f"module {_describe(module)}", f"other {_describe(other)}"
    misfit.extend(f"the map names {k!r}, which is not in weight_names" for k in mapping if k not in names)
    plans: list[_TiePlan] = []
    for name in names:
        try:
            src_name, spec = _parse_entry(name, mapping.get(name, name))
            transform = _as_transform(spec)
        except SurgeryError as err:
            misfit.append(f"{name!r}: {err}")
            continue
        slot = mod_slots.get(name)
        src = oth_slots.get(src_name)
        if slot is None:
            unknown.append(_unknown(name, mod_slots, where_mod))
        if src is None and not (slot is None and other is module and src_name == name):
            unknown.append(_unknown(src_name, oth_slots, where_oth))
        if slot is None or src is None:
            continue
        pair = f"{name!r} -> {src_name!r}"
        why_not = transform.tie_problem()
        if why_not is not None:
            misfit.append(f"{pair}: {why_not}; copy with set_weights instead")
            continue
        if slot.kind == _PARAMETRIZED:
            misfit.append(f"{pair}: {name!r} has a parametrization ({_plist_names(slot)}); remove it first")
            continue
        rooted = src.root()
        if rooted is None:
            misfit.append(
                f"{pair}: {src_name!r} is computed by a parametrization ({_plist_names(src)}), "
                "not held in a Parameter, so nothing can be tied to it"
            )
            continue
        root, base = rooted
        full = base.then(transform)
        problem = _fit(slot, src_name, root, full, pair)
        if problem:
            misfit.append(problem)
            continue
        full = _simplify(full, root)
        current_root, current_t = slot.root()  # type: ignore[misc]
        if current_root is root:
            if current_t.specs() == full.specs():
                continue  # tied already
            if slot.kind == _PARAM:
                misfit.append(
                    f"{pair}: cyclic tie, {src_name!r} is computed from {name!r} itself ({full}); untie_weights() first"
                )
                continue
        plans.append(_TiePlan(slot, src_name, root, full))
    _conflicts(module, mod_slots, plans, misfit)
    return plans


def _plist_names(slot: _Slot) -> str:
    return ", ".join(type(p).__name__ for p in slot.plist)


def _fit(slot: _Slot, src_name: str, root: nn.Parameter, full: Transform, pair: str) -> str | None:
    """A message if ``full(root)`` does not fit the weight in ``slot``, else None."""
    target = slot.value()
    mine, theirs = f"module's {slot.name!r}", f"other's {src_name!r}"
    try:
        with torch.no_grad():
            out = full.apply(root.detach(), allow_copy=False)
    except TransformError as err:
        return f"{pair}: {err} ({theirs} has shape {_shape(root)}, {mine} has shape {_shape(target)})"
    how = "" if full.is_identity else f", and after {full} {_shape(out)}"
    if _shape(out) != _shape(target):
        return f"{pair}: shape misfit, {mine} has shape {_shape(target)}; {theirs} has shape {_shape(root)}{how}"
    if out.dtype != target.dtype:
        return f"{pair}: dtype misfit, {mine} is {_dtype(target)}; {theirs} is {_dtype(root)}"
    if root.device != target.device:
        return f"{pair}: device misfit, {mine} is on {target.device}; {theirs} is on {root.device}"
    if root.device.type != "meta" and not _same_storage(out, root):
        return f"{pair}: {full} of {theirs} is not a view of it, so it cannot stay tied"
    return None


def _simplify(transform: Transform, root: torch.Tensor) -> Transform:
    """A composed chain in its simplest form, read from the view it gives of ``root``: the
    identity (a SAME tie) or one ``transpose`` / ``permute`` when it only reorders dims."""
    with torch.no_grad():
        out = transform.apply(root.detach(), allow_copy=False)
    if out.dim() != root.dim() or out.storage_offset() != root.storage_offset():
        return transform
    free = list(range(root.dim()))
    perm = []
    for size, stride in zip(out.shape, out.stride(), strict=True):
        match = next((d for d in free if (root.shape[d], root.stride(d)) == (size, stride)), None)
        if match is None:
            return transform
        free.remove(match)
        perm.append(match)
    if perm == sorted(perm):
        return IDENTITY
    if root.dim() == 2:
        return parse_transform("transpose")
    return parse_transform(f"permute({','.join(map(str, perm))})")


def _conflicts(module: nn.Module, slots: dict[str, _Slot], plans: list[_TiePlan], misfit: list[str]) -> None:
    """A weight whose Parameter is replaced must not leave other weights tied to the old one."""
    retied = {p.slot.key for p in plans}
    for plan in plans:
        if plan.slot.kind != _PARAM:
            continue  # a tied view: nothing is tied to it (ties point at roots)
        old = plan.slot.param
        for other_plan in plans:
            if other_plan.root is old and other_plan is not plan:
                misfit.append(
                    f"{other_plan.slot.name!r} -> {other_plan.source_name!r}: the source "
                    f"{other_plan.source_name!r} is re-tied ({plan.slot.name!r}) in the same call; "
                    "tie in two calls"
                )
        for slot in slots.values():
            if slot.key in retied or slot.kind == _PARAMETRIZED:
                continue
            if slot.param is old:
                misfit.append(
                    f"conflicting ties: {slot.name!r} is "
                    f"{'the same Parameter as' if slot.kind == _PARAM else 'tied to'} "
                    f"{plan.slot.name!r}, which is re-tied; tie {slot.name!r} in the same call "
                    "or untie_weights() it first"
                )


def _apply_tie(owner: nn.Module, attr: str, root: nn.Parameter, transform: Transform, source_name: str) -> None:
    if parametrize.is_parametrized(owner, attr):
        view = plist_of(owner, attr)[0]
        if plist_of(owner, attr).original is root and view.specs() == transform.specs():
            return  # the same (owner, attr) reached by two names
        _drop_tie(owner, attr)
    if transform.is_identity:
        owner.register_parameter(attr, root)
    else:
        _install_tie(owner, attr, root, transform, source_name)


def _drop_tie(owner: nn.Module, attr: str) -> None:
    """Replace a tied view by a Parameter of its own holding its current value.

    The source is swapped out of ``original`` first, so that torch's removal never
    touches it (``remove_parametrizations`` would ``set_`` it otherwise)."""
    plist = plist_of(owner, attr)
    source = plist.original
    with torch.no_grad():
        value = getattr(owner, attr).detach().clone()
    plist.register_parameter("original", nn.Parameter(value, requires_grad=source.requires_grad))
    parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)


def untie_weights(module: nn.Module, names: Iterable[str] | str | None = None) -> list[str]:
    """Give weights of ``module`` tensors of their own, with their current values.

    With ``names``, each named weight gets a new Parameter (a tied view becomes a plain
    Parameter; a SAME-tied weight, inside this module or with another one, gets a copy);
    unknown names are an error. With ``None``, every tie inside ``module`` is undone
    (:func:`tied_weights`) and so is every tied view onto another module. The sources
    keep their Parameters. Returns the names untied.
    """
    slots = _slots(module)
    if names is None:
        targets = [*tied_weights(module), *(s.name for s in slots.values() if s.kind == _TIE)]
        targets = list(dict.fromkeys(targets))
    else:
        targets = [names] if isinstance(names, str) else list(dict.fromkeys(names))
        unknown = [_unknown(n, slots, _describe(module)) for n in targets if n not in slots]
        misfit = [
            f"{n!r} has a parametrization ({_plist_names(slots[n])}), not a tie"
            for n in targets
            if n in slots and slots[n].kind == _PARAMETRIZED
        ]
        _raise_problems(f"cannot untie weights of {_describe(module)}", unknown, misfit)
    done: set[tuple[int, str]] = set()
    for name in targets:
        slot = slots[name]
        if slot.key in done:
            continue
        done.add(slot.key)
        if parametrize.is_parametrized(slot.owner, slot.attr):
            _drop_tie(slot.owner, slot.attr)
        else:
            p = _param(slot.owner, slot.attr)
            with torch.no_grad():
                fresh = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            slot.owner.register_parameter(slot.attr, fresh)
    return targets


def tied_weights(module: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """The ties inside ``module``: ``{alias name: (source name, transform specs)}``.

    Names holding one Parameter are SAME ties (``[]``) to the first of them in
    ``named_parameters`` order; a tied view is a tie to the first name holding its source,
    with its specs. A tied view whose source no weight name of ``module`` holds (a tie to
    another module) is no tie inside ``module`` and is not listed. The tied views'
    invariants are checked.
    """
    slots = list(_slots(module).values())
    holder: dict[int, str] = {}
    out: dict[str, tuple[str, list[str]]] = {}
    for slot in slots:
        if slot.kind == _PARAM:
            first = holder.setdefault(id(slot.param), slot.name)
            if first != slot.name:
                out[slot.name] = (first, [])
    for slot in slots:
        if slot.kind == _TIE:
            _check_tie(slot.owner, slot.attr, slot.name)
            source = holder.get(id(slot.param))
            if source is not None:
                out[slot.name] = (source, slot.view.specs())
    return out
