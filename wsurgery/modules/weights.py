"""Copying values in and out of a live module (:func:`get_weights`, :func:`set_weights`)
and switching gradients (:func:`freeze`, :func:`unfreeze`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .slots import (
    _PARAM,
    _PARAMETRIZED,
    _TIE,
    _describe,
    _raise_problems,
    _same_storage,
    _shape,
    _Slot,
    _slots,
    _unknown,
)

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
