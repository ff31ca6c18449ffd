"""The state dict in what a torch checkpoint unpickled to.

:func:`extract_state_dict` takes the top-level dict of tensors, or the one under
``STATE_DICT_KEYS``, or a pickled ``nn.Module``'s ``state_dict()``, and flattens nested
dicts of string keys into dotted names, in file order. Invariants:

- every tensor name is a string that encodes to UTF-8;
- only dense, non-meta tensors are kept; everything else is a one-line entry of
  ``PickleResult.skipped``, bounded and printable (:func:`describe`, :func:`_label`);
- a view that claims more bytes than both its storage and the file (a stride-0 size
  bomb) is refused with an InputError;
- every walk is cycle-safe, and the placeholder walk is bounded.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field

from ...errors import InputError
from .interpreter import Placeholder, printable, short

STATE_DICT_KEYS = ("state_dict", "model", "module")


@dataclass
class PickleResult:
    tensors: dict  # name -> torch.Tensor, in file order
    skipped: list[str] = field(default_factory=list)  # what was not a tensor, one line each
    container: str | None = None  # the key the state dict was found under, if any
    route: str = "torch.load(weights_only=True)"  # or "restricted unpickler (...)"


def _placeholders_in(value, limit: int = 10_000) -> list[str]:
    """The globals of the placeholders found in ``value`` (bounded walk, cycles safe)."""
    found: dict[str, None] = {}
    seen: set[int] = set()
    todo = [value]
    while todo and len(seen) < limit:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, Placeholder):
            found.setdefault(v.of)
            todo.extend([v.state, *v.args, *v.items, *v.keys.keys(), *v.keys.values()])
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            todo.extend(v)
    return list(found)


def describe(value) -> str:
    """How ``skipped`` names a value that is not a tensor."""
    if isinstance(value, Placeholder):
        return f"placeholder for {value.of}"
    kind = type(value).__name__
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        inner = _placeholders_in(value)
        if inner:
            more = f" and {len(inner) - 3} more" if len(inner) > 3 else ""
            return f"{kind} holding placeholders for {', '.join(inner[:3])}{more}"
    return kind


def _module_state(value) -> OrderedDict | None:
    """A pickled ``nn.Module`` (a placeholder with module state) as its ``state_dict()``."""
    import torch

    def module_dict(p):
        if isinstance(p, Placeholder) and isinstance(p.state, dict) and isinstance(p.state.get("_parameters"), dict):
            return p.state
        return None

    if module_dict(value) is None:
        return None
    out: OrderedDict = OrderedDict()
    seen: set[int] = set()
    todo = [("", value)]  # a stack: depth first, in state_dict() order
    while todo:
        prefix, mod = todo.pop()
        state = module_dict(mod)
        if state is None or id(mod) in seen:
            continue
        seen.add(id(mod))
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for group in ("_parameters", "_buffers"):
            entries = state.get(group)
            if isinstance(entries, dict):
                for name, t in entries.items():
                    if isinstance(name, str) and isinstance(t, torch.Tensor) and name not in skip:
                        out[prefix + name] = t
        children = state.get("_modules")
        if isinstance(children, dict):
            todo.extend(reversed([(f"{prefix}{n}.", m) for n, m in children.items() if isinstance(n, str)]))
    return out


def _check_tensor(name: str, t, file_size: int, path) -> str | None:
    """Why ``t`` cannot be stored (``None`` if it can); refuses size bombs outright."""
    import torch

    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        return f"{str(t.layout).removeprefix('torch.')} tensor (only dense tensors are stored)"
    if t.device.type == "meta":
        return "meta tensor without data"
    nbytes = t.numel() * t.element_size()
    held = t.untyped_storage().nbytes()
    if nbytes > held and nbytes > file_size:
        raise InputError(
            f"{path}: tensor {_label(name)!r} is a {tuple(t.shape)} view over {held} bytes of storage: written out it "
            f"would take {nbytes} bytes, more than the {file_size}-byte file holds",
            hint="a stride-0 (expanded) view this large is a size bomb; save tensor.clone() if it is real",
        )
    return None


def _valid_name(name) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def extract_state_dict(obj, path: str) -> PickleResult:
    """Find the tensors in what a torch checkpoint unpickled to."""
    import torch

    try:
        file_size = os.path.getsize(path)
    except (OSError, TypeError):
        file_size = 0
    as_module = _module_state(obj)
    if as_module is not None:
        obj = as_module
    if isinstance(obj, torch.Tensor):
        raise InputError(f"{path}: the file holds a single tensor, not a state dict")
    if not isinstance(obj, dict):
        raise InputError(
            f"{path}: expected a dict of tensors, found {describe(obj)}",
            hint="save model.state_dict() with torch.save",
        )
    container = None
    skipped: list[str] = []
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        inner = _module_state(inner) or inner
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            container = key
            skipped.extend(f"{_label(k)}: {describe(v)}" for k, v in obj.items() if k != key)
            obj = inner
            break
    if not all(isinstance(k, str) for k in obj):
        bad = next(k for k in obj if not isinstance(k, str))
        raise InputError(f"{path}: state dict keys must be strings, found {short(bad)}")
    tensors: dict = {}
    # Depth-first over nested dicts of string keys, in file order; cycles are skipped.
    todo: list = [("", iter(obj.items()), id(obj))]
    on_path = {id(obj)}
    while todo:
        prefix, items, ident = todo[-1]
        step = next(items, None)
        if step is None:
            todo.pop()
            on_path.discard(ident)
            continue
        key, value = step
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if not _valid_name(name):
                raise InputError(f"{path}: tensor name {short(name)} is not valid Unicode")
            why = _check_tensor(name, value, file_size, path)
            if why:
                skipped.append(f"{_label(name)}: {why}")
            else:
                tensors[name] = value
        elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            if id(value) in on_path:
                skipped.append(f"{_label(name)}: a reference cycle")
                continue
            on_path.add(id(value))
            todo.append((name + ".", iter(value.items()), id(value)))
        else:
            skipped.append(f"{_label(name)}: {describe(value)}")
    return PickleResult(tensors=tensors, skipped=skipped, container=container)


def _label(key) -> str:
    text = key if isinstance(key, str) else short(key)
    return printable(text.encode("utf-8", "backslashreplace").decode("utf-8"))
