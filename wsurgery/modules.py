"""Weight sharing on live ``torch.nn.Module`` objects: copy, tie, freeze, save and load.

This is the API that NeMo 0.x documented for its neural modules, built as documented:

* :func:`get_weights` / :func:`set_weights` copy values. ``get_weights`` returns detached
  clones, so later updates to the module never reach the returned dict (and writing into
  the dict never reaches the module); ``set_weights`` copies into the existing Parameters
  (same objects, same dtype and device), accepts any subset of names, and checks every name
  and shape before it writes anything.
* :func:`tie_weights` makes weights of ``module`` *be* weights of ``other``: one value, one
  gradient, one optimizer state.

  - ``WeightShareTransform.SAME`` (no transform): ``module``'s attribute is replaced by
    ``other``'s ``Parameter`` object, so both modules hold the same Parameter.
  - ``WeightShareTransform.TRANSPOSE`` and every other *view* transform of
    :mod:`wsurgery.transforms` (``transpose(d0,d1)``, ``permute``, ``reshape``, ``slice``):
    a parametrization (:func:`torch.nn.utils.parametrize.register_parametrization`) computes
    ``module``'s weight as a view of ``other``'s one Parameter. Non-view steps (``cast``,
    ``scale``) make a new tensor and are refused for a tie; copy with ``set_weights``.

* :func:`freeze` / :func:`unfreeze` switch ``requires_grad``; :func:`tied_weights` lists the
  ties inside one module; :func:`save_module` / :func:`load_module` write and read
  safetensors that store each tied weight once and record its ties, so that loading
  re-creates them.
* :class:`WeightSharing` is a mixin giving an ``nn.Module`` subclass NeMo's method names.

Names are the dotted names of ``named_parameters()``, with one change: a parametrized
weight is named as its attribute (``head.weight``), never by torch's internal
``head.parametrizations.weight.original``, so a module keeps its names whether or not it
is tied. Names that reach one tensor under two module paths (a shared submodule, a SAME
tie) are all listed, as ``named_parameters(remove_duplicate=False)`` does.

Invariants of a tied view
-------------------------
A weight ``owner.<attr>`` tied with a view transform ``T`` to a source Parameter ``S``
(the name ``<alias>`` below) satisfies, from the moment :func:`tie_weights` returns:

1. ``owner.parametrizations[attr]`` is a ``ParametrizationList`` holding exactly one
   parametrization, a :class:`TiedView` that records ``T`` and the alias's shape.
2. ``owner.parametrizations[attr].original is S``: the source Parameter object itself, not
   a copy and not a second Parameter over the same storage. ``module.parameters()``
   therefore yields ``S`` (deduplicated against ``other.parameters()`` by identity, as torch
   does for any shared Parameter), gradients of a loss on either side accumulate in
   ``S.grad``, and an optimizer keeps a single state for it.
3. ``TiedView.forward(S) == T(S)`` is a view of ``S`` (it shares ``S``'s storage) with the
   recorded shape, and ``S``'s dtype and device. The values therefore always agree, with no
   copy, and converting either module (``.to()``, ``.half()``, ``.cuda()``) keeps the tie.

``S`` is always a *root*: a plain Parameter of its owner, never itself a tied view. Tying
to a tied weight composes the transforms onto that weight's root. Breaking the invariants
from outside (appending a parametrization, replacing ``original``, resizing ``S`` in place)
is detected where ties are used (the parametrization's forward, :func:`tied_weights`,
:func:`save_module`) and reported as a ``SurgeryError`` that prints both values.

``TiedView`` has no ``right_inverse``: ``owner.weight = tensor`` on a tied weight is refused
by torch (it would otherwise replace the source's storage). Write values with
:func:`set_weights`, which writes through the view into the source, or untie first with
:func:`untie_weights`.

A tie is made after the module is built and before its optimizer is: SAME replaces the
Parameter object an optimizer created earlier would hold.
"""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import SurgeryError, TransformError, UnknownNameError
from .transforms import IDENTITY, Transform
from .transforms import parse as parse_transform

__all__ = [
    "LoadResult",
    "TiedView",
    "WeightShareTransform",
    "WeightSharing",
    "freeze",
    "get_weights",
    "load_module",
    "save_module",
    "set_weights",
    "tie_weights",
    "tied_weights",
    "unfreeze",
    "untie_weights",
]


# ----------------------------------------------------------------------------- transforms


class WeightShareTransform(enum.Enum):
    """How a tied weight is computed from its source (NeMo's enum, values are step specs)."""

    SAME = "same"
    TRANSPOSE = "transpose"

    @classmethod
    def parse(cls, value: Any) -> WeightShareTransform:
        """A member from itself, its name or value in any case (``"SAME"``, ``"transpose"``,
        ``"WeightShareTransform.TRANSPOSE"``) or NeMo's integer values (0, 1)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            members = list(cls)
            if 0 <= value < len(members):
                return members[value]
        elif isinstance(value, str):
            key = value.strip().rsplit(".", 1)[-1].lower()
            for member in cls:
                if key == member.value:
                    return member
        choices = [m.name for m in cls]
        close = difflib.get_close_matches(str(value).upper(), choices, n=1)
        raise TransformError(
            f"unknown weight share transform {value!r}; valid: {', '.join(choices)}",
            hint=f"did you mean {close[0]}?" if close else None,
        )

    def specs(self) -> list[str]:
        """The transform step specs: ``[]`` for SAME, ``["transpose"]`` for TRANSPOSE."""
        return [] if self is WeightShareTransform.SAME else [self.value]

    @property
    def transform(self) -> Transform:
        return parse_transform(self.specs())


def _as_transform(value: Any) -> Transform:
    """A ``WeightShareTransform``, spec string, list of specs or ``Transform`` -> Transform."""
    if value is None:
        return IDENTITY
    if isinstance(value, WeightShareTransform):
        return value.transform
    if isinstance(value, str) and value.strip().lower().startswith("weightsharetransform."):
        return WeightShareTransform.parse(value).transform
    if isinstance(value, int) and not isinstance(value, bool):
        return WeightShareTransform.parse(value).transform
    return parse_transform(value)


# ----------------------------------------------------------------------------- the parametrization


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device:
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta and other storage-less tensors
        return False


class TiedView(nn.Module):
    """The parametrization of a weight tied with a view transform to a source Parameter.

    ``forward(original)`` returns ``transform(original)``; ``original`` is the source
    Parameter itself (see the module docstring for the invariants). ``source`` is the
    source's name in the module it was tied to, for messages and ``repr`` only. The tied
    weight's dtype and device are the source's (a view has no others), so ``.to()``,
    ``.half()`` or ``.cuda()`` on either module keep the tie.
    """

    def __init__(self, transform: Transform, source: str, shape: tuple[int, ...]):
        super().__init__()
        self.transform = transform
        self.source = source
        self.alias_shape = tuple(shape)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        out = self.transform.apply(original, allow_copy=False)
        if _shape(out) != self.alias_shape:
            raise SurgeryError(
                f"tied weight broken: the source {self.source!r} no longer fits.\n"
                f"tied shape: {self.alias_shape}\n"
                f"{self.transform}(source) shape: {_shape(out)} (source shape {_shape(original)})",
                hint="untie_weights() before changing the source's shape",
            )
        return out

    def specs(self) -> list[str]:
        return self.transform.specs()

    def extra_repr(self) -> str:
        return f"source={self.source!r}, transform='{self.transform}', shape={self.alias_shape}"


# ----------------------------------------------------------------------------- weight slots

_PARAM, _TIE, _PARAMETRIZED = "param", "tie", "parametrized"


@dataclass(frozen=True)
class _Slot:
    """One logical weight: ``owner.<attr>``, reached as ``name`` from the root module."""

    name: str
    owner: nn.Module
    attr: str
    kind: str  # _PARAM: owner._parameters[attr]; _TIE: our TiedView; _PARAMETRIZED: other

    @property
    def key(self) -> tuple[int, str]:
        return id(self.owner), self.attr

    @property
    def plist(self) -> Any:
        return self.owner.parametrizations[self.attr]

    @property
    def param(self) -> nn.Parameter:
        """The Parameter of a plain slot, or the source of a tied one."""
        if self.kind == _PARAM:
            return self.owner._parameters[self.attr]
        if self.kind == _TIE:
            return self.plist.original
        raise AssertionError(self.kind)

    @property
    def view(self) -> TiedView:
        return self.plist[0]

    def root(self) -> tuple[nn.Parameter, Transform] | None:
        """``(root Parameter, transform from it)``; None for a foreign parametrization."""
        if self.kind == _PARAM:
            return self.param, IDENTITY
        if self.kind == _TIE:
            return self.param, self.view.transform
        return None

    def value(self) -> torch.Tensor:
        """The weight's current value (a view for a tie; computed for a parametrization)."""
        if self.kind == _PARAM:
            return self.param
        return getattr(self.owner, self.attr)

    def originals(self) -> list[torch.Tensor]:
        """The trainable tensors behind the weight."""
        if self.kind != _PARAMETRIZED:
            return [self.param]
        plist = self.plist
        if plist.is_tensor:
            return [plist.original]
        return [getattr(plist, f"original{i}") for i in range(plist.ntensors)]


def _is_tie(owner: nn.Module, attr: str) -> bool:
    plist = owner.parametrizations[attr]
    return len(plist) == 1 and isinstance(plist[0], TiedView) and plist.is_tensor


def _walk(module: nn.Module, prefix: str = "") -> Iterator[_Slot]:
    """Every logical weight, in ``named_parameters`` order, duplicates included."""
    for attr, p in module._parameters.items():
        if p is not None:
            yield _Slot(prefix + attr, module, attr, _PARAM)
    parametrized = parametrize.is_parametrized(module)
    if parametrized:
        for attr in module.parametrizations:
            kind = _TIE if _is_tie(module, attr) else _PARAMETRIZED
            yield _Slot(prefix + attr, module, attr, kind)
    for child_name, child in module._modules.items():
        if child is None or (parametrized and child_name == "parametrizations"):
            continue
        yield from _walk(child, f"{prefix}{child_name}.")


def _slots(module: nn.Module) -> dict[str, _Slot]:
    _require_module(module)
    return {s.name: s for s in _walk(module)}


def _walk_buffers(module: nn.Module, prefix: str = "") -> Iterator[_Slot]:
    """Persistent buffers (the ones ``state_dict`` holds), duplicates included."""
    for attr, b in module._buffers.items():
        if b is not None and attr not in module._non_persistent_buffers_set:
            yield _Slot(prefix + attr, module, attr, "buffer")
    parametrized = parametrize.is_parametrized(module)
    for child_name, child in module._modules.items():
        if child is None or (parametrized and child_name == "parametrizations"):
            continue
        yield from _walk_buffers(child, f"{prefix}{child_name}.")


def _require_module(module: Any) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")


def _describe(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


# ----------------------------------------------------------------------------- errors


def _unknown(name: str, known: Iterable[str], where: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    text = f"no weight {name!r} in {where}"
    if close:
        text += f" (did you mean {', '.join(repr(c) for c in close)}?)"
    return text


def _raise_problems(action: str, unknown: list[str], misfit: list[str], hint: str | None = None) -> None:
    """One error listing every problem: ``SurgeryError`` when any is a misfit, else
    ``UnknownNameError``. The problems are also on the error as ``.problems``."""
    problems = unknown + misfit
    if not problems:
        return
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    text = f"{action}: {count}: " + "; ".join(problems)
    if misfit:
        raise SurgeryError(text, problems=problems, hint=hint)
    err = UnknownNameError(
        unknown[0],
        message=text,
        hint=hint or "names are those of named_parameters(); parametrized weights by their attribute",
    )
    err.problems = problems  # type: ignore[attr-defined]
    raise err


# ----------------------------------------------------------------------------- get / set


def get_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of every weight of ``module``, by dotted name.

    Later updates to the module do not change the returned tensors, nor the other way
    round. Ties inside the module are kept inside the dict, as ``state_dict`` does: the
    names of one Parameter map to one clone, and a weight tied with a view maps to the
    same view of its source's clone. A weight under a foreign parametrization maps to a
    clone of its current value.
    """
    clones: dict[int, torch.Tensor] = {}

    def clone_of(p: torch.Tensor) -> torch.Tensor:
        if id(p) not in clones:
            clones[id(p)] = p.detach().clone()
        return clones[id(p)]

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for slot in _slots(module).values():
            if slot.kind == _PARAM:
                out[slot.name] = clone_of(slot.param)
            elif slot.kind == _TIE:
                out[slot.name] = slot.view.transform.apply(clone_of(slot.param))
            else:
                out[slot.name] = slot.value().detach().clone()
    return out


def _check_value(name: str, slot: _Slot, value: Any, misfit: list[str]) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            misfit.append(f"{name!r}: the value is a {type(value).__name__}, not a tensor")
            return None
    current = slot.value()
    if _shape(value) != _shape(current):
        misfit.append(
            f"{name!r}: shape misfit, the module's weight has shape {_shape(current)}, "
            f"the value has shape {_shape(value)}"
        )
        return None
    if slot.kind == _PARAMETRIZED:
        missing = [type(p).__name__ for p in slot.plist if not hasattr(p, "right_inverse")]
        if missing:
            misfit.append(
                f"{name!r} is parametrized by {', '.join(missing)} without a right_inverse, "
                "so a value cannot be written to it"
            )
            return None
    return value


def _write(slot: _Slot, value: torch.Tensor) -> None:
    """Copy ``value`` into the weight (checked); ties are written through to the source."""
    with torch.no_grad():
        if slot.kind == _PARAM:
            slot.param.copy_(value)
        elif slot.kind == _TIE:
            slot.view.transform.apply(slot.param).copy_(value)
        else:
            current = slot.value()
            setattr(slot.owner, slot.attr, value.to(device=current.device, dtype=current.dtype))


def set_weights(module: nn.Module, weights: Mapping[str, Any]) -> None:
    """Copy values into ``module``'s weights, by dotted name; any subset of names.

    Values are copied under ``torch.no_grad`` into the existing Parameters, which keep
    their identity, dtype and device. A tied weight is written through its tie (so the
    source, and every weight tied to it, takes the value); when several given names reach
    one tensor, the last one wins, as in ``load_state_dict``. Every name and shape is
    checked first: unknown names (with close matches) and shape misfits are reported
    together in one error (``SurgeryError`` if any misfit, else ``UnknownNameError``)
    and nothing is written.
    """
    slots = _slots(module)
    unknown: list[str] = []
    misfit: list[str] = []
    plan: list[tuple[_Slot, torch.Tensor]] = []
    for name, value in weights.items():
        slot = slots.get(name)
        if slot is None:
            unknown.append(_unknown(name, slots, _describe(module)))
            continue
        checked = _check_value(name, slot, value, misfit)
        if checked is not None:
            plan.append((slot, checked))
    _raise_problems(f"cannot set weights of {_describe(module)}", unknown, misfit)
    # A value that overlaps a weight's storage (a view of the module's own weights) is
    # cloned first, so that no write reads memory an earlier write changed.
    roots = [s.value() if s.kind == _PARAMETRIZED else s.param for s, _ in plan]
    for i, (slot, value) in enumerate(plan):
        if any(_same_storage(value, r) for r in roots):
            plan[i] = (slot, value.detach().clone())
    for slot, value in plan:
        _write(slot, value)


# ----------------------------------------------------------------------------- ties


def _install_tie(
    slot_owner: nn.Module, attr: str, source: nn.Parameter, transform: Transform, source_name: str
) -> None:
    """Tie ``owner.<attr>`` (a plain Parameter now) to ``transform(source)``."""
    current = slot_owner._parameters[attr]
    view = TiedView(transform, source_name, _shape(current))
    # unsafe=True: the parametrization maps the *source's* shape to the alias's, so torch's
    # registration check (forward(current) keeps current's shape) does not apply. Our own
    # checks ran before (see tie_weights) and run after (_check_tie).
    parametrize.register_parametrization(slot_owner, attr, view, unsafe=True)
    # Invariant 2: the source Parameter itself becomes ``original``; the alias's old
    # Parameter is dropped untouched (torch only ever ``set_``s it to itself).
    slot_owner.parametrizations[attr].register_parameter("original", source)
    _check_tie(slot_owner, attr, attr)


def _check_tie(owner: nn.Module, attr: str, name: str) -> None:
    """Enforce the invariants of a tied view (module docstring); raise printing both values."""
    plist = owner.parametrizations[attr]
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
        if not transform.is_view:
            steps = [s for s in transform.steps if not s.is_view]
            misfit.append(
                f"{pair}: a tie takes view steps only (same, transpose, permute, reshape, "
                f"slice), got {', '.join(s.spec() for s in steps)}; copy with set_weights instead"
            )
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
        view = owner.parametrizations[attr][0]
        if owner.parametrizations[attr].original is root and view.specs() == transform.specs():
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
    plist = owner.parametrizations[attr]
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
            p = slot.owner._parameters[slot.attr]
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


# ----------------------------------------------------------------------------- freeze


def _select(module: nn.Module, names: Iterable[str] | str | None, action: str) -> list[_Slot]:
    slots = _slots(module)
    if names is None:
        return list(slots.values())
    names = [names] if isinstance(names, str) else list(names)
    chosen: list[_Slot] = []
    unknown: list[str] = []
    for name in names:
        if name in slots:
            chosen.append(slots[name])
            continue
        prefix = name.rstrip(".") + "."
        under = [s for n, s in slots.items() if n.startswith(prefix)]
        if under:
            chosen.extend(under)
        else:
            unknown.append(_unknown(name, slots, _describe(module)))
    _raise_problems(f"cannot {action} weights of {_describe(module)}", unknown, [])
    return chosen


def freeze(module: nn.Module, names: Iterable[str] | str | None = None) -> None:
    """``requires_grad = False`` on every weight, or on the named ones (a name may also be a
    module prefix such as ``encoder``). A tied weight is its source: freezing either side
    freezes both. Unknown names: one error listing them, nothing changed."""
    for slot in _select(module, names, "freeze"):
        for t in slot.originals():
            t.requires_grad_(False)


def unfreeze(module: nn.Module, names: Iterable[str] | str | None = None) -> None:
    """``requires_grad = True`` on every weight, or on the named ones (see :func:`freeze`)."""
    for slot in _select(module, names, "unfreeze"):
        for t in slot.originals():
            t.requires_grad_(True)


# ----------------------------------------------------------------------------- save / load


class LoadResult(NamedTuple):
    """What :func:`load_module` did not match, as torch's ``load_state_dict`` reports."""

    missing: list[str]  # names of the module absent from the file
    unexpected: list[str]  # names of the file absent from the module


def save_module(
    module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None, *, sync: bool = True
) -> None:
    """Write ``module``'s weights and persistent buffers to a safetensors file.

    Each tied weight is stored once and its ties inside the module (:func:`tied_weights`)
    are recorded as alias metadata (``wsurgery.aliases``, plus the ``save_model``
    convention for SAME ties), so :func:`load_module` re-creates them. A tied view onto
    another module, or a weight under a foreign parametrization, is stored as its value.
    Names holding one buffer are stored once too. The write is atomic; ``sync=False``
    skips the fsyncs (see :func:`wsurgery.save_state_dict`).
    """
    from .api import save_state_dict

    ties = tied_weights(module)
    state: dict[str, torch.Tensor] = {}
    for slot in _slots(module).values():
        if slot.name in ties:
            continue
        if slot.kind == _PARAM:
            state[slot.name] = slot.param.detach()
        else:
            with torch.no_grad():
                state[slot.name] = slot.value().detach().clone(memory_format=torch.contiguous_format)
    aliases: dict[str, tuple[str, list[str]]] = dict(ties)
    seen: dict[int, str] = {}
    for slot in _walk_buffers(module):
        buf = slot.owner._buffers[slot.attr]
        first = seen.setdefault(id(buf), slot.name)
        if first != slot.name:
            aliases[slot.name] = (first, [])
        else:
            state[slot.name] = buf.detach()
    save_state_dict(state, path, metadata, aliases=aliases, sync=sync)


def load_module(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadResult:
    """Load weights and persistent buffers from a checkpoint into ``module``, in place, and
    re-create the ties recorded in it (any format :func:`wsurgery.load` reads).

    A recorded tie between two weights of the module is re-made as by :func:`tie_weights`:
    one Parameter for SAME, a :class:`TiedView` for a transform (the module's other ties
    are kept). Values are copied into the existing tensors, keeping their identity, dtype
    and device. With ``strict`` (the default), names missing from the file or unknown to
    the module are errors; every name, shape and tie is checked before anything changes,
    and all problems are reported together. A tie the module has and the file does not
    record is kept if the file's values agree with it, and is an error otherwise.
    Returns the names that did not match, as ``LoadResult(missing, unexpected)``.
    """
    from .api import open as open_checkpoint

    _require_module(module)
    with open_checkpoint(path) as ckpt:
        return _load_into(module, ckpt, strict)


def _load_into(module: nn.Module, ckpt: Any, strict: bool) -> LoadResult:
    slots = _slots(module)
    buffers = {s.name: s for s in _walk_buffers(module)}
    names = [*slots, *(n for n in buffers if n not in slots)]
    in_file = set(ckpt.stored) | set(ckpt.aliases)
    missing = [n for n in names if n not in in_file]
    unexpected = [n for n in ckpt.names() if n not in slots and n not in buffers]
    unknown: list[str] = []
    misfit: list[str] = []
    where = ckpt.path or "the checkpoint"
    if strict:
        for name in unexpected:
            unknown.append(_unknown(name, names, f"module {_describe(module)} (from {where})"))
        for name in missing:
            unknown.append(f"{name!r} of the module is missing from {where}")

    # Ties to re-create, and values to copy (aliases whose tie cannot be made live get
    # their value copied instead).
    tie_map: dict[str, tuple[str, list[str]]] = {}
    buffer_ties: dict[str, str] = {}
    values: list[str] = [n for n in ckpt.stored if n in slots or n in buffers]
    for name, alias in ckpt.aliases.items():
        if name in slots and alias.source in slots:
            tie_map[name] = (alias.source, alias.transform.specs())
        elif name in buffers and alias.source in buffers and alias.transform.is_identity:
            buffer_ties[name] = alias.source
        elif name in slots or name in buffers:
            if strict:
                misfit.append(
                    f"{name!r} is tied to {alias.source!r} in {where}, which is not a "
                    f"{'weight' if name in slots else 'buffer'} of the module"
                )
            values.append(name)
    for name in values:
        target = slots.get(name) or buffers[name]
        shape, _ = ckpt.shape_dtype(name)
        current = target.owner._buffers[target.attr] if target.kind == "buffer" else target.value()
        if tuple(shape) != _shape(current):
            misfit.append(
                f"{name!r}: shape misfit, the module's has shape {_shape(current)}, {where} has shape {tuple(shape)}"
            )
        elif target.kind == _PARAMETRIZED:
            _check_value(name, target, current, misfit)
    for name, source in buffer_ties.items():
        a, b = buffers[name].owner._buffers[buffers[name].attr], buffers[source].owner._buffers[buffers[source].attr]
        if (_shape(a), a.dtype) != (_shape(b), b.dtype):
            misfit.append(f"buffer {name!r} ({_shape(a)}) cannot share {source!r} ({_shape(b)})")
    misfit.extend(_untracked_ties(module, ckpt, where))
    plans = _plan_ties(module, module, list(tie_map), tie_map, unknown, misfit) if tie_map else []
    _raise_problems(f"cannot load {where} into {_describe(module)}", unknown, misfit)

    for plan in plans:
        _apply_tie(plan.slot.owner, plan.slot.attr, plan.root, plan.transform, plan.source_name)
    for name, source in buffer_ties.items():
        src = buffers[source]
        buffers[name].owner.register_buffer(buffers[name].attr, src.owner._buffers[src.attr])
    slots = _slots(module)
    done: set[tuple[int, str]] = set()
    for name in values:
        target = slots.get(name) or buffers[name]
        if target.key in done:
            continue
        done.add(target.key)
        if target.kind == "buffer":
            buf = target.owner._buffers[target.attr]
            with torch.no_grad():
                buf.copy_(ckpt.tensor(name, device=buf.device))
        else:
            device = target.value().device
            _write(target, ckpt.tensor(name, device=device if device.type != "meta" else "cpu"))
    return LoadResult(missing, unexpected)


def _untracked_ties(module: nn.Module, ckpt: Any, where: str) -> list[str]:
    """Ties of ``module`` that the file stores as separate tensors with values that differ."""
    problems = []
    for alias, (source, specs) in tied_weights(module).items():
        if alias not in ckpt.stored or source not in ckpt:
            continue
        expected = parse_transform(specs).apply(ckpt.tensor(source))
        found = ckpt.tensor(alias)
        if _shape(expected) != _shape(found) or not torch.equal(expected, found.to(expected.dtype)):
            how = "the same tensor as" if not specs else f"tied ({' -> '.join(specs)}) to"
            problems.append(
                f"{alias!r} is {how} {source!r} in the module, but {where} stores different "
                f"values for them; untie_weights({alias!r}) first to load both"
            )
    return problems


# ----------------------------------------------------------------------------- the mixin


class WeightSharing:
    """Mixin for ``nn.Module`` subclasses: NeMo's weight-sharing methods.

    ``class Decoder(WeightSharing, nn.Module): ...`` gains ``get_weights()``,
    ``set_weights(weights)``, ``tie_weights_with(module, weight_names,
    name2name_and_transform)``, ``untie_weights(names)``, ``tied_weights()``,
    ``freeze(names)`` and ``unfreeze(names)``, which call this module's functions.
    """

    def get_weights(self) -> dict[str, torch.Tensor]:
        return get_weights(self)  # type: ignore[arg-type]

    def set_weights(self, weights: Mapping[str, Any]) -> None:
        set_weights(self, weights)  # type: ignore[arg-type]

    def tie_weights_with(
        self,
        module: nn.Module,
        weight_names: Iterable[str] | str | None = None,
        name2name_and_transform: Mapping[str, Any] | None = None,
    ) -> None:
        tie_weights(self, module, weight_names, name2name_and_transform)  # type: ignore[arg-type]

    def untie_weights(self, names: Iterable[str] | str | None = None) -> list[str]:
        return untie_weights(self, names)  # type: ignore[arg-type]

    def tied_weights(self) -> dict[str, tuple[str, list[str]]]:
        return tied_weights(self)  # type: ignore[arg-type]

    def freeze(self, names: Iterable[str] | str | None = None) -> None:
        freeze(self, names)  # type: ignore[arg-type]

    def unfreeze(self, names: Iterable[str] | str | None = None) -> None:
        unfreeze(self, names)  # type: ignore[arg-type]
