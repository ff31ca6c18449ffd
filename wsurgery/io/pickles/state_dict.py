"""The state dict in what a torch checkpoint unpickled to.

:func:`extract_state_dict` takes the top-level dict of tensors, or the one under
``STATE_DICT_KEYS``, or a pickled ``nn.Module``'s ``state_dict()``, and flattens nested
containers into dotted names, in file order: dicts of string or integer keys
(``optimizer.state.0.exp_avg``), and lists and tuples that hold tensors or containers
(by index). Invariants:

- every tensor name is a string that encodes to UTF-8, and names one tensor: two tensors
  that flatten to one name (``{"a.b": t1, "a": {"b": t2}}``, or a module's parameter
  and buffer of one name) are an InputError naming both;
- only dense, non-meta tensors are kept; everything else is a one-line entry of
  ``PickleResult.skipped``, bounded and printable (:func:`describe`, :func:`_label`);
- a view that claims more bytes than both its storage and the file (a stride-0 size
  bomb) is refused with an InputError;
- every walk is cycle-safe and bounded: a container reached by several paths is listed
  under each of them (a shared sub-dict is a tie, as torch.load gives it), but the names
  the walks produce, counted in characters, are bounded by the file's size
  (:class:`_Names`), so a few kilobytes of dicts that share themselves 40 times over
  (2**40 paths) are refused, naming a shared container; the placeholder search behind
  ``describe`` visits at most ``_DESCRIBE_BUDGET`` items over the whole checkpoint and
  looks at each value once.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

from ...errors import InputError
from .interpreter import Placeholder, printable, short

STATE_DICT_KEYS = ("state_dict", "model", "module", "model_state", "model_state_dict")  # training wrappers


@dataclass
class PickleResult:
    tensors: dict  # name -> torch.Tensor, in file order
    skipped: list[str] = field(default_factory=list)  # what was not a tensor, one line each
    container: str | None = None  # the key the state dict was found under, if any
    route: str = "torch.load(weights_only=True)"  # or "restricted unpickler (...)"


_DESCRIBE_BUDGET = 1_000_000  # items the placeholder searches of one checkpoint visit, all together
_NAME_CHARS_MIN = 16 << 20  # characters of tensor names any file may produce
_NAME_CHARS_PER_BYTE = 8  # ... and per byte of the file, past that


class _Describer:
    """:func:`describe` for every skipped entry of one checkpoint, in linear time overall.

    A value's placeholders are searched once (by identity: a million-item list under
    100,000 keys is searched once, not 100,000 times), each search visits at most
    ``limit`` items, and all of them together at most ``budget``; past that a value is
    described by its type alone."""

    def __init__(self, budget: int = _DESCRIBE_BUDGET, limit: int = 10_000):
        self.left = budget
        self.limit = limit
        self.cache: dict[int, tuple[object, list[str]]] = {}

    def placeholders_in(self, value) -> list[str]:
        """The globals of the placeholders found in ``value`` (bounded walk, cycles safe)."""
        if id(value) in self.cache:
            return self.cache[id(value)][1]
        found: dict[str, None] = {}
        seen: set[int] = set()
        todo = [value]
        start = left = min(self.left, self.limit)
        while todo and left > 0:
            v = todo.pop()
            left -= 1
            if id(v) in seen:
                continue
            seen.add(id(v))
            if isinstance(v, Placeholder):
                found.setdefault(v.of)
                inner = [v.state, *islice(v.args, left), *islice(v.items, left), *_pairs(v.keys, left)]
            elif isinstance(v, dict):
                inner = _pairs(v, left)
            elif isinstance(v, (list, tuple, set, frozenset)):
                inner = list(islice(v, left))
            else:
                continue
            left -= len(inner)
            todo.extend(inner)
        self.left -= start - max(left, 0)
        self.cache[id(value)] = (value, list(found))  # holding the value keeps its id its own
        return self.cache[id(value)][1]

    def __call__(self, value) -> str:
        if isinstance(value, Placeholder):
            return f"placeholder for {value.of}"
        kind = type(value).__name__
        if isinstance(value, (dict, list, tuple, set, frozenset)):
            inner = self.placeholders_in(value)
            if inner:
                more = f" and {len(inner) - 3} more" if len(inner) > 3 else ""
                return f"{kind} holding placeholders for {', '.join(inner[:3])}{more}"
        return kind


def _pairs(d: dict, n: int) -> list:
    """The keys and values of the first ``n`` entries of ``d``, flat."""
    return [x for kv in islice(d.items(), n) for x in kv]


def describe(value) -> str:
    """How ``skipped`` names a value that is not a tensor."""
    return _Describer()(value)


def _where(keys) -> str:
    """A path of keys as Python spells it (``['a']['b']``), bounded: a long one shows its
    first three and last four keys, where two paths to one container differ."""
    shown = [short(k) for k in keys] if len(keys) <= 8 else [*map(short, keys[:3]), "...", *map(short, keys[-4:])]
    return printable("".join(f"[{k}]" for k in shown), limit=300)


class _Names:
    """The characters of the names a flattening produces, bounded by the file's size.

    Containers reached by several paths are listed under each; a few kilobytes of dicts
    that share themselves (``d = {"a": d, "b": d}``, 40 times over) would produce 2**40
    names, and a chain of dicts nested 100,000 deep names of a quadratic total length, so
    past the budget the file is refused, naming a container it shares when it shares one."""

    def __init__(self, path, file_size: int):
        self.path = path
        self.file_size = file_size
        self.left = max(_NAME_CHARS_MIN, _NAME_CHARS_PER_BYTE * file_size)
        self.entered: dict[int, tuple] = {}  # id(container) -> the keys it was first reached by
        self.shared: tuple | None = None  # (first keys, second keys) of a container reached twice

    def enter(self, container, keys: tuple) -> None:
        first = self.entered.setdefault(id(container), keys)
        if first is not keys and self.shared is None:
            self.shared = (first, keys)

    def charge(self, name: str) -> None:
        self.left -= len(name) + 1
        if self.left >= 0:
            return
        if self.shared is not None:
            why = (
                f"the dict at {_where(self.shared[0])} is also at {_where(self.shared[1])}: a container shared by "
                "many paths is listed under each of them"
            )
        else:
            why = "its dicts nest too deep or their keys are too long"
        raise InputError(
            f"{self.path}: flattening its nested dicts gives more tensor names than a {self.file_size}-byte file "
            f"describes: {why}",
            hint="a checkpoint built to expand when read; save a plain state dict with torch.save",
        )


def _collision(path, name: str, first: str, second: str) -> InputError:
    return InputError(
        f"{path}: two tensors flatten to the name {_label(name)!r}: {first} and {second}",
        hint="rename one of them in the state dict with torch and save it again",
    )


def _module_state(value, names: _Names, tensor_type) -> OrderedDict | None:
    """A pickled ``nn.Module`` (a placeholder with module state) as its ``state_dict()``."""

    def module_dict(p):
        if isinstance(p, Placeholder) and isinstance(p.state, dict) and isinstance(p.state.get("_parameters"), dict):
            return p.state
        return None

    if module_dict(value) is None:
        return None
    out: OrderedDict = OrderedDict()
    origin: dict[str, str] = {}
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
                    if isinstance(name, str) and isinstance(t, tensor_type) and name not in skip:
                        full = prefix + name
                        names.charge(full)
                        where = f"{group[1:-1]} {_label(name)!r} of module {_label(prefix[:-1]) or '(root)'!r}"
                        if full in out:
                            raise _collision(names.path, full, origin[full], where)
                        out[full] = t
                        origin[full] = where
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


def extract_state_dict(obj, path: str, *, tensor_type=None, file_size: int | None = None) -> PickleResult:
    """Find the tensors in what a torch checkpoint unpickled to.

    ``tensor_type``: the class of the tensors to find, ``torch.Tensor`` when None; the
    scan's ``ScannedTensor`` for a checkpoint read without torch, whose tensors the caller
    checks (nothing is checked or remembered here). ``file_size``: the bytes of the
    checkpoint (by default the size of the file at ``path``)."""
    scanned = tensor_type is not None
    if tensor_type is None:
        import torch

        tensor_type = torch.Tensor
    if file_size is None:
        try:
            file_size = os.path.getsize(path)
        except (OSError, TypeError):
            file_size = 0
    names = _Names(path, file_size)
    describe_ = _Describer()
    as_module = _module_state(obj, names, tensor_type)
    whole = obj if as_module is None else None  # a pickled module has no structure to keep
    if as_module is not None:
        obj = as_module
    if isinstance(obj, tensor_type):
        raise InputError(f"{path}: the file holds a single tensor, not a state dict")
    if not isinstance(obj, dict):
        raise InputError(
            f"{path}: expected a dict of tensors, found {describe_(obj)}",
            hint="save model.state_dict() with torch.save",
        )
    container = None
    skipped: list[str] = []
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        inner = _module_state(inner, names, tensor_type) or inner
        if isinstance(inner, dict) and any(isinstance(v, tensor_type) for v in inner.values()):
            container = key
            skipped.extend(f"{_label(k)}: {describe_(v)}" for k, v in obj.items() if k != key)
            obj = inner
            break
    tensors: dict = {}
    origin: dict[str, tuple] = {}  # name -> (keys of its dict, its key), to name both sides of a collision
    # Depth-first over nested containers, in file order: dicts (string or integer keys:
    # optimizer.state.0.exp_avg), and lists and tuples that hold tensors or containers
    # (by index). A container in which no tensor turns up is one skipped entry, not one
    # per leaf. Cycles are skipped.
    top = () if container is None else (container,)
    # frame: (prefix, items, id, keys, the container and its name, skipped and tensors counts at entry)
    todo: list = [("", iter(obj.items()), id(obj), top, None, 0, 0)]
    on_path = {id(obj)}
    looked: dict[int, bool] = {}  # lists and tuples looked into, by identity
    while todo:
        prefix, items, ident, keys, where, skipped_at, tensors_at = todo[-1]
        step = next(items, None)
        if step is None:
            todo.pop()
            on_path.discard(ident)
            if where is not None and len(tensors) == tensors_at and len(skipped) > skipped_at:
                del skipped[skipped_at:]  # no tensor below: the container is one entry
                skipped.append(f"{_label(where[1])}: {describe_(where[0])}")
            continue
        key, value = step
        if not _is_key(key):
            skipped.append(f"{_label(prefix)}[{short(key)}]: {describe_(value)}")
            continue
        name = f"{prefix}{key}"
        names.charge(name)
        if isinstance(value, tensor_type):
            if not _valid_name(name):
                raise InputError(f"{path}: tensor name {short(name)} is not valid Unicode")
            why = None if scanned else _check_tensor(name, value, file_size, path)
            if why:
                skipped.append(f"{_label(name)}: {why}")
            elif name in tensors:
                raise _collision(path, name, _where((*origin[name][0], origin[name][1])), _where((*keys, key)))
            else:
                tensors[name] = value
                origin[name] = (keys, key)
        elif _walks_into(value, tensor_type, looked):
            if id(value) in on_path:
                skipped.append(f"{_label(name)}: a reference cycle")
                continue
            on_path.add(id(value))
            inner_keys = (*keys, key)
            names.enter(value, inner_keys)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            todo.append((name + ".", iter(items), id(value), inner_keys, (value, name), len(skipped), len(tensors)))
        else:
            skipped.append(f"{_label(name)}: {describe_(value)}")
    if isinstance(whole, dict) and not scanned:
        from .structure import remember, skeleton

        remember(path, skeleton(whole, {(*keys, key): name for name, (keys, key) in origin.items()}))
    return PickleResult(tensors=tensors, skipped=skipped, container=container)


def _is_key(key) -> bool:
    """Dict keys that make a name: strings and integers (not bools)."""
    return isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))


def _walks_into(value, tensor_type, seen: dict[int, bool]) -> bool:
    """Whether the walk goes inside ``value``: a non-empty dict, or a list or tuple holding
    a tensor or a container (a list of numbers stays one entry). Each list is looked at
    once (``seen``, by identity), however many keys share it."""
    if type(value) in (dict, OrderedDict):
        return bool(value)
    if type(value) in (list, tuple):
        known = seen.get(id(value))
        if known is None:
            known = seen[id(value)] = any(isinstance(v, (tensor_type, dict, list, tuple)) for v in value)
        return known
    return False


def _label(key) -> str:
    text = key if isinstance(key, str) else short(key)
    return printable(text.encode("utf-8", "backslashreplace").decode("utf-8"))
