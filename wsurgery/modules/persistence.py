"""Saving a module with its ties recorded, and loading one back re-creating them
(:func:`save_module`, :func:`load_module`)."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import lookup
from ..transforms import parse as parse_transform
from .slots import (
    _PARAM,
    _PARAMETRIZED,
    _buffer,
    _describe,
    _raise_problems,
    _require_module,
    _shape,
    _slots,
    _unknown,
    _walk_buffers,
)
from .ties import _apply_tie, _plan_ties, tied_weights
from .weights import _check_value, _write

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
    from ..api import save_state_dict

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
        buf = _buffer(slot.owner, slot.attr)
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
    from ..api import open as open_checkpoint

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
        shape, _ = lookup.shape_dtype(ckpt, name)
        current = _buffer(target.owner, target.attr) if target.kind == "buffer" else target.value()
        if tuple(shape) != _shape(current):
            misfit.append(
                f"{name!r}: shape misfit, the module's has shape {_shape(current)}, {where} has shape {tuple(shape)}"
            )
        elif target.kind == _PARAMETRIZED:
            _check_value(name, target, current, misfit)
    for name, source in buffer_ties.items():
        a, b = _buffer(buffers[name].owner, buffers[name].attr), _buffer(buffers[source].owner, buffers[source].attr)
        if (_shape(a), a.dtype) != (_shape(b), b.dtype):
            misfit.append(f"buffer {name!r} ({_shape(a)}) cannot share {source!r} ({_shape(b)})")
    misfit.extend(_untracked_ties(module, ckpt, where))
    plans = _plan_ties(module, module, list(tie_map), tie_map, unknown, misfit) if tie_map else []
    _raise_problems(f"cannot load {where} into {_describe(module)}", unknown, misfit)

    for plan in plans:
        _apply_tie(plan.slot.owner, plan.slot.attr, plan.root, plan.transform, plan.source_name)
    for name, source in buffer_ties.items():
        src = buffers[source]
        buffers[name].owner.register_buffer(buffers[name].attr, _buffer(src.owner, src.attr))
    slots = _slots(module)
    done: set[tuple[int, str]] = set()
    for name in values:
        target = slots.get(name) or buffers[name]
        if target.key in done:
            continue
        done.add(target.key)
        if target.kind == "buffer":
            buf = _buffer(target.owner, target.attr)
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
