"""torch.save files, loaded without ever executing pickled code.

Zip-format files go through ``torch.load(weights_only=True, mmap=True)`` (tensor data
stays in the page cache until touched); legacy files through ``weights_only=True``.
The state dict is the top-level dict of tensors, or the dict found under
``state_dict`` / ``model`` / ``module`` (Lightning, DeepSpeed-style checkpoints).
Entries that are not tensors are reported as skipped.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field

from ..errors import InputError, UnsafePickleError

STATE_DICT_KEYS = ("state_dict", "model", "module")


@dataclass
class PickleResult:
    tensors: dict  # name -> torch.Tensor, in file order
    skipped: list[str] = field(default_factory=list)  # what was not a tensor, one line each
    container: str | None = None  # the key the state dict was found under, if any


_GLOBAL_RE = re.compile(
    r"(?:Unsupported global|unsupported GLOBAL|global):?\s*(?:GLOBAL\s+)?([\w.]+(?:\s[\w.]+)?)", re.I
)


def _refused_global(message: str) -> str | None:
    m = _GLOBAL_RE.search(message)
    return m.group(1).replace(" ", ".") if m else None


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
    import torch

    try:
        with _name_torch_will_not_dispatch(path) as name:
            return torch.load(name, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        glob = _refused_global(text)
        what = f"global {glob}" if glob else "a construct outside the weights-only allow-list"
        raise UnsafePickleError(
            f"{path}: refused to unpickle {what}; wsurgery never runs code from a checkpoint",
            hint="re-save the checkpoint's state_dict with torch.save, or convert it where you trust its code",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot read torch checkpoint: {first[:300]}") from None


def _flatten(obj, prefix: str, out: dict, skipped: list[str]) -> None:
    import torch

    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            _flatten(value, name + ".", out, skipped)
        else:
            skipped.append(f"{name}: {type(value).__name__}")


def extract_state_dict(obj, path: str) -> PickleResult:
    """Find the tensors in what a torch checkpoint unpickled to."""
    import torch

    if isinstance(obj, torch.Tensor):
        raise InputError(f"{path}: the file holds a single tensor, not a state dict")
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    container = None
    skipped: list[str] = []
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            container = key
            skipped.extend(f"{k}: {type(v).__name__}" for k, v in obj.items() if k != key)
            obj = inner
            break
    tensors: dict = {}
    if not all(isinstance(k, str) for k in obj):
        raise InputError(f"{path}: state dict keys must be strings")
    _flatten(obj, "", tensors, skipped)
    return PickleResult(tensors=tensors, skipped=skipped, container=container)


def load_pickle(path: str, zip_format: bool) -> PickleResult:
    return extract_state_dict(torch_load(path, mmap=zip_format), path)
