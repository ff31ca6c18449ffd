"""Loading a torch file: scan, then ``torch.load(weights_only=True)``, then, if torch's
allow-list refused a global the scan found harmless, the restricted unpickler.

Invariants:

- :func:`load_pickle` hands nothing to ``torch.load`` or the restricted unpickler before
  :func:`scan` has validated the file (:func:`torch_load` trusts its caller to have
  scanned); a path ending in ``.safetensors`` is never handed to torch under that name
  (torch would dispatch on the suffix, not the bytes);
- the restricted load rebuilds tensors over a private, copy-on-write mapping of the
  file, so the input is never modified, and only over storages the scan validated (same
  key, size and type);
- a big-endian legacy file is read by torch's loader or not at all;
- failures are an UnsafePickleError (a refused global or construct) or another InputError
  (exit 3 both).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import warnings

from ...errors import InputError, UnsafePickleError
from .allowlist import Resolver, StorageRef
from .interpreter import Malformed, Placeholder, Source, Unpickler, budget_for, first_line
from .layout import Layout, bad, scan, storage_claim
from .state_dict import PickleResult, extract_state_dict

_GLOBAL_RE = re.compile(r"(?:Unsupported global|unsupported GLOBAL|global):?\s*(?:GLOBAL\s+)?([\w.]+)", re.I)


def _refused_global(message: str) -> str | None:
    m = _GLOBAL_RE.search(message)
    return m.group(1) if m else None


@contextlib.contextmanager
def _name_torch_will_not_dispatch(path: str):
    """torch.load hands any path ending in ``.safetensors`` to safetensors, whatever the bytes.

    The format was found from the bytes, so give torch a name without that suffix: the
    open file's ``/proc/self/fd`` entry on Linux, a temporary symlink elsewhere.
    """
    if not os.fspath(path).endswith(".safetensors"):
        yield path
        return
    with open(path, "rb") as f:
        proc = f"/proc/self/fd/{f.fileno()}"
        if os.path.exists(proc):
            yield proc
            return
    with tempfile.TemporaryDirectory() as tmp:
        link = os.path.join(tmp, "checkpoint.pt")
        os.symlink(os.path.abspath(path), link)
        yield link


def torch_load(path: str, mmap: bool):
    """``torch.load(weights_only=True)``; a global outside torch's allow-list is an
    :class:`UnsafePickleError` naming it, any other failure an :class:`InputError`.

    Call :func:`scan` first: torch's own unpickler trusts the file's layout.
    """
    import torch

    try:
        with warnings.catch_warnings(), _name_torch_will_not_dispatch(path) as name:
            warnings.simplefilter("ignore")
            return torch.load(name, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        glob = _refused_global(str(exc))
        what = f"global {glob}" if glob else "a construct outside the weights-only allow-list"
        raise UnsafePickleError(
            f"{path}: torch's weights-only loader refused {what}",
            hint="re-save the checkpoint's state_dict with torch.save, or convert it where you trust its code",
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile file may make torch raise anything
        raise InputError(f"{path}: cannot read torch checkpoint: {first_line(exc)}") from None


def _restricted_load(layout: Layout):
    """Load with the allow-list interpreter: unknown globals stay inert placeholders."""
    import torch

    path = layout.path
    if layout.big_endian and not layout.zip:
        raise bad(path, "a big-endian legacy checkpoint needs torch's own loader, which refused it")
    if layout.pickle_bytes is not None:
        data = layout.pickle_bytes
    else:
        with open(path, "rb") as f:
            f.seek(layout.pickle_span[0])
            data = f.read(layout.pickle_span[1] - layout.pickle_span[0])
    try:
        overall = torch.UntypedStorage.from_file(path, False, layout.size) if layout.size else None
    except RuntimeError:  # torch refuses to map more than the file holds
        raise InputError(f"{path}: the file changed while it was read") from None
    storages: dict[str, StorageRef] = {}

    def persistent(pid):
        claim = storage_claim(pid, legacy=not layout.zip)
        if claim is None:
            return Placeholder("a pickled module's source")
        if claim.key not in storages:
            known = layout.claims.get(claim.key)
            if known is None or (known.nbytes, known.dtype_name) != (claim.nbytes, claim.dtype_name):
                raise Malformed(f"storage {claim.key!r} differs from the scanned one")
            start, nbytes = layout.records[claim.key]
            untyped = overall[start : start + nbytes] if nbytes else torch.UntypedStorage(0)
            dtype = getattr(torch, claim.dtype_name)
            if layout.big_endian and claim.itemsize > 1:
                untyped.byteswap(dtype)  # a private, copy-on-write mapping: the file is untouched
            storages[claim.key] = StorageRef(untyped, dtype)
        ref = storages[claim.key]
        if claim.view is not None:
            vkey, off, numel = claim.view
            sub = ref.untyped[off * claim.itemsize : (off + numel) * claim.itemsize]
            return storages.setdefault(vkey, StorageRef(sub, ref.dtype))
        return ref

    resolver = Resolver(path, calls=True)
    interp = Unpickler(Source(data), resolver, persistent, budget=budget_for(layout.size))
    try:
        obj = interp.load()
    except Malformed as exc:
        raise bad(path, str(exc)) from None
    return obj, interp.notes, sorted(resolver.placeholders)


def load_pickle(path: str, zip_format: bool) -> PickleResult:
    """Scan, then ``torch.load(weights_only=True)``, then the restricted unpickler if torch refused."""
    layout = scan(path, zip_format)
    try:
        obj = torch_load(path, mmap=zip_format)
        notes: list[str] = []
        route = "torch.load(weights_only=True)"
    except UnsafePickleError as refused:
        obj, notes, placeholders = _restricted_load(layout)
        glob = _refused_global(str(refused)) or "a construct outside its allow-list"
        route = f"restricted unpickler (torch's weights-only loader refused {glob})"
        shown = ", ".join(placeholders[:5]) + (f" and {len(placeholders) - 5} more" if len(placeholders) > 5 else "")
        line = f"(read by wsurgery's restricted unpickler: torch's weights-only loader refused {glob}"
        notes.insert(0, line + (f"; inert placeholders for {shown})" if shown else ")"))
    result = extract_state_dict(obj, path)
    result.skipped = [*notes, *result.skipped]
    result.route = route
    return result
