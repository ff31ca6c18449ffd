"""The structure of a torch checkpoint, kept so that a torch output can have it again.

Reading a torch file flattens it to named tensors; a torch file written from it keeps the
input's structure: the same containers and keys, the numbers, strings, bools and None
where they were, each tensor in its place (``ckpt["model_state"]``, Lightning's
``epoch``, ``global_step``, ``hyper_parameters`` stay). The structure is a *skeleton*:
the input's containers (dicts, lists, tuples) with every stored tensor replaced by a
:class:`Slot` naming it; it is remembered per input file (its real path, size and
modification time) when the file is read and recalled when writing.

Writing (:func:`fill`) follows the surgery: a slot whose tensor is gone (dropped, or
renamed away) is removed from its container; a tensor the skeleton has no slot for (a
new or renamed name) is put at its dotted name, into the containers that name walks
through. What cannot be written as plain pickle data (objects of other classes, the
placeholders of the restricted unpickler) is left out and listed.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """Where a stored tensor sat: its flattened name."""

    name: str


_LOCK = threading.Lock()
_KEPT: dict[tuple, object] = {}
_MAX_KEPT = 64


def _key(path) -> tuple | None:
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def remember(path, skeleton) -> None:
    """Keep ``skeleton`` for the file ``path`` as it is now."""
    key = _key(path)
    if key is None or skeleton is None:
        return
    with _LOCK:
        if len(_KEPT) >= _MAX_KEPT:
            _KEPT.pop(next(iter(_KEPT)))
        _KEPT[key] = skeleton


def recall(path):
    """The skeleton kept for ``path`` (None: none, or the file changed since)."""
    key = _key(path)
    with _LOCK:
        return None if key is None else _KEPT.get(key)


def skeleton(obj, paths: dict[tuple, str]):
    """``obj`` with the tensors at ``paths`` (key paths -> names) replaced by slots: the
    containers on the way to a tensor are copied, everything else is kept by reference
    (a list shared by many keys is not copied once per key)."""
    on_way = {keys[:i] for keys in paths for i in range(len(keys))}

    def walk(value, keys: tuple):
        name = paths.get(keys)
        if name is not None:
            return Slot(name)
        if keys not in on_way or not isinstance(value, (dict, list, tuple)):
            return value
        if isinstance(value, dict):
            out = OrderedDict() if isinstance(value, OrderedDict) else {}
            for k, v in value.items():
                out[k] = walk(v, (*keys, k))
            return out
        items = [walk(v, (*keys, i)) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items

    return walk(obj, ())


MAX_DEPTH = 100  # containers nested deeper than this are not carried
MAX_ITEMS = 1_000_000  # values written, all together, past which the rest is not carried


_PLAIN = (str, int, float, bool, type(None))


def fill(skel, names: list[str], prefix: tuple = ()) -> tuple[object, list[str], dict]:
    """The skeleton with only the slots of ``names`` kept and every other name of
    ``names`` added at its dotted place under ``prefix`` (the keys of the state dict's
    container); returns ``(tree, what was not carried, {slot name: tensor})``, the last
    the tensors outside the state dict (optimizer state of a wrapped checkpoint), which
    are carried as they are."""
    wanted = set(names)
    placed: set[str] = set()
    lost: list[str] = []
    extra: dict[str, object] = {}

    done: dict[int, object] = {}  # id -> what a shared container became (written once, shared)
    busy: set[int] = set()
    budget = [MAX_ITEMS]

    def walk(value, where: str, depth: int = 0):
        budget[0] -= 1
        if isinstance(value, Slot):
            if value.name in wanted:
                placed.add(value.name)
                return value
            return _GONE
        if isinstance(value, _PLAIN):
            return value
        if isinstance(value, (dict, list, tuple)):
            if id(value) in done:
                return done[id(value)]
            if id(value) in busy:
                lost.append(f"{where or '(top)'}: a reference cycle")
                return _GONE
            if depth >= MAX_DEPTH or budget[0] < 0:
                lost.append(f"{where or '(top)'}: {type(value).__name__} (nested too deep or too large)")
                return _GONE
            busy.add(id(value))
            try:
                got = _container(value, where, depth)
            finally:
                busy.discard(id(value))
            done[id(value)] = got
            return got
        if _is_plain_tensor(value):  # a tensor outside the state dict (optimizer state): carried as it is
            slot = Slot(f"\0carried:{len(extra)}")
            extra[slot.name] = value
            return slot
        lost.append(f"{where or '(top)'}: {type(value).__name__}")
        return _GONE

    def _container(value, where: str, depth: int):
        if isinstance(value, dict):
            out = OrderedDict() if isinstance(value, OrderedDict) else {}
            if type(value) not in (dict, OrderedDict):
                lost.append(f"{where or '(top)'}: {type(value).__name__} written as a dict")
            for k, v in value.items():
                if not isinstance(k, _PLAIN):
                    lost.append(f"{where}[{k!r}]: a key of type {type(k).__name__}")
                    continue
                got = walk(v, f"{where}.{k}" if where else str(k), depth + 1)
                if got is not _GONE:
                    out[k] = got
            return out
        items = [walk(v, f"{where}.{i}" if where else str(i), depth + 1) for i, v in enumerate(value)]
        items = [v for v in items if v is not _GONE]
        return tuple(items) if isinstance(value, tuple) else items

    tree = walk(skel, "")
    if not isinstance(tree, dict):
        return None, lost, {}
    for name in names:
        if name not in placed:
            _put(tree, prefix, name)
    return tree, lost, extra


def _is_plain_tensor(value) -> bool:
    import torch

    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type == "cpu"
    )


class _Gone:
    pass


_GONE = _Gone()


def _put(tree: dict, prefix: tuple, name: str) -> None:
    """Put the slot of ``name`` at its dotted place under ``tree[prefix...]``: through the
    longest run of existing containers, the rest of the name as one key."""
    node = tree
    for k in prefix:
        nxt = node.get(k) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            break
        node = nxt
    parts = name.split(".")
    while len(parts) > 1:
        for n in range(len(parts) - 1, 0, -1):
            key = ".".join(parts[:n])
            nxt = _child(node, key)
            if isinstance(nxt, dict):
                node, parts = nxt, parts[n:]
                break
        else:
            break
    if isinstance(node, dict):
        node[".".join(parts)] = Slot(name)


def _child(node, key: str):
    if not isinstance(node, dict):
        return None
    if key in node:
        return node[key]
    if key.isdigit() and int(key) in node:
        return node[int(key)]
    return None


def structure_for(ckpt, names: list[str], notes: list[str] | None = None):
    """The filled structure a torch output of ``ckpt`` (its tensors ``names``) keeps: that
    of the torch file it was read from, as ``(tree, {slot name: tensor carried as it
    is})``; None when it was not read from one (a flat state dict is written). ``notes``
    gets a line naming what could not be carried."""
    from ..options import Note

    path = getattr(ckpt, "path", None)
    if not path or not str(getattr(ckpt, "format", "")).startswith("torch"):
        return None
    skel = recall(path)
    if skel is None or (isinstance(skel, dict) and all(isinstance(v, Slot) for v in skel.values())):
        return None  # none kept, or a flat state dict: nothing more than the flat output
    prefix = (ckpt.container,) if getattr(ckpt, "container", None) else ()
    tree, lost, extra = fill(skel, names, prefix)
    if tree is None:
        return None
    if lost and notes is not None:
        shown = "; ".join(lost[:5]) + (f"; and {len(lost) - 5} more" if len(lost) > 5 else "")
        notes.append(Note(f"structure kept, but not carried: {shown}", kind="structure", entries=lost))
    elif notes is not None:
        notes.append(
            Note("the input's structure kept ({option} writes a flat state dict)", option="flat", kind="structure")
        )
    return tree, extra
