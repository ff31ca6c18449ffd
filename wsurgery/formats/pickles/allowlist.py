"""Which globals a pickle may name, and what each becomes.

Invariants:

- a global on the refused list (:func:`refused_global`: code, the system, file loaders,
  dunder names) refuses the whole file with an UnsafePickleError, in the scan and in the
  restricted load alike, even when a placeholder would have done;
- in the scan (``Resolver(calls=False)``) a global is a storage type or an inert
  :class:`Placeholder`, never anything callable;
- in the restricted load (``calls=True``) the only callables are the entries of
  ``_SAFE_FUNCTIONS``: torch's rebuild functions and a few constructors, re-implemented
  here so that their arguments are checked (type, sign, size) before torch sees them; tensors
  are built only over a :class:`StorageRef`, a slice of the file's private mapping;
- torch is imported inside the functions that need it, never when this module is.
"""

from __future__ import annotations

import functools
from collections import Counter, OrderedDict

from ...errors import UnsafePickleError
from .interpreter import Malformed, Placeholder, Safe, StorageType, TypeRef, canonical, printable, short

# ----------------------------------------------------------------------------- refusals

# Globals that run code or reach the system. Their presence anywhere in a pickle refuses
# the file: no checkpoint needs them, and a placeholder would hide an attack.
_REFUSED_MODULES = frozenset(
    """
    os posix nt posixpath ntpath sys subprocess _posixsubprocess shutil socket _socket ssl importlib imp
    zipimport pkgutil runpy code codeop pty tty ctypes _ctypes cffi pickle _pickle cPickle pickletools marshal
    shelve dill cloudpickle joblib multiprocessing _multiprocessing concurrent asyncio threading _thread signal
    resource fcntl mmap select selectors pdb bdb inspect gc operator _operator webbrowser platform sysconfig site
    ensurepip venv distutils setuptools pip timeit trace profile cProfile tracemalloc atexit codecs io _io urllib
    urllib2 urllib3 http httplib ftplib smtplib telnetlib requests httpx paramiko glob fileinput tarfile zipfile
    sqlite3 dbm pydoc doctest unittest commands popen2 numpy.f2py numpy.distutils numpy.testing numpy.lib.npyio
    torch.hub torch.package torch.jit torch.ops torch.utils.cpp_extension torch._dynamo torch._inductor
    torch.multiprocessing torch.distributed.rpc
    """.split()
)
_REFUSED_NAMES = {
    "builtins": frozenset(
        """
        eval exec execfile compile getattr setattr delattr hasattr open input globals locals vars dir breakpoint
        exit quit help print memoryview type super object classmethod staticmethod property map filter iter next
        reversed sorted apply reload file copyright credits license
        """.split()
    ),
    "types": frozenset("FunctionType LambdaType CodeType MethodType ModuleType CellType".split()),
    "torch": frozenset("load save compile from_file".split()),
    "numpy": frozenset("load save fromfile memmap loadtxt genfromtxt frompyfunc vectorize".split()),
    "copyreg": frozenset("add_extension pickle constructor".split()),
    "torch.serialization": frozenset("load _load _legacy_load save _save _legacy_save".split()),
}


_SCRIPT_MODULES = frozenset({"__main__", "__mp_main__"})


def refused_global(module: str, name: str) -> bool:
    """True for a global that runs code or reaches the system: the file is refused.

    Refused: every global of a module on the refused list (``os``, ``posix``,
    ``subprocess``, ``sys``, ``socket``, ``importlib``, ``ctypes``, ``pickle``, ``operator``,
    ``io``, ``torch.jit`` ... and their submodules), the calling builtins (``eval``,
    ``exec``, ``compile``, ``getattr``, ``open``, ``__import__`` ...), function and code
    types, file loaders of torch and numpy, and any dunder name (``__import__``,
    ``__class__``, ``__subclasses__``). Everything else that torch's allow-list does not
    know becomes an inert placeholder.
    """
    module, name = canonical(module, name)
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in _REFUSED_MODULES:
            return True
    first = name.split(".")[0]
    # A training script's own classes pickle as ``__main__.Config``: never imported, they
    # become placeholders like any unknown class. Other dunder names are refused.
    modules = [p for p in parts if p not in _SCRIPT_MODULES]
    if any(p.startswith("__") and p.endswith("__") and len(p) > 4 for p in [*modules, *name.split(".")]):
        return True
    return first in _REFUSED_NAMES.get(module, ())


def _unsafe(path, qualname: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused to unpickle global {qualname}: it runs code or reaches the system, "
        "and wsurgery never runs code from a checkpoint",
        hint="load it only where you trust its author, then save model.state_dict() with torch.save",
    )


# ----------------------------------------------------------------------------- the allow-list


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(is_int(d) for d in x):
        raise Malformed(f"a tensor's {what} is not a sequence of integers: {short(x)}")
    if any(d < 0 or d.bit_length() > 62 for d in x):
        raise Malformed(f"a tensor's {what} holds a negative or oversized value")
    return tuple(x)


class StorageRef:
    """A storage rebuilt over the file: an untyped slice of the private mapping, and its dtype."""

    __slots__ = ("untyped", "dtype")

    def __init__(self, untyped, dtype):
        self.untyped = untyped
        self.dtype = dtype


def _set(storage, offset, size, stride, dtype=None):
    import torch

    if not isinstance(storage, StorageRef):
        raise Malformed(f"a tensor is rebuilt over {short(storage)}, not a storage")
    if not is_int(offset) or offset < 0 or offset.bit_length() > 62:
        raise Malformed(f"a tensor has storage offset {short(offset)}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise Malformed(f"a tensor has {len(size)} sizes but {len(stride)} strides")
    t = torch.empty((0,), dtype=dtype if dtype is not None else storage.dtype)
    return t.set_(storage.untyped, offset, size, stride)


def _metadata(interp, t, metadata):
    if metadata:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items()
        ):
            raise Malformed("a tensor's metadata is not a dict of flags")
        import torch

        torch._utils.set_tensor_metadata(t, metadata)
    return t


def _rebuild_tensor(interp, storage, offset, size, stride):
    return _set(storage, offset, size, stride)


def _rebuild_tensor_v2(interp, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _metadata(interp, _set(storage, offset, size, stride), metadata)


def _rebuild_tensor_v3(interp, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    import torch

    if not isinstance(dtype, torch.dtype):
        raise Malformed(f"a tensor's dtype is {short(dtype)}")
    if isinstance(storage, StorageRef) and storage.dtype != torch.uint8:
        raise Malformed("_rebuild_tensor_v3 over a typed storage")
    return _metadata(interp, _set(storage, offset, size, stride, dtype), metadata)


def _tensor_arg(x, what: str):
    import torch

    if not isinstance(x, torch.Tensor):
        raise Malformed(f"{what} of a {short(x)}, not a tensor")
    return x


def _parameter(interp, data=None, requires_grad=True, *rest):
    import torch

    if data is None:
        data = torch.empty(0)
    if rest or not isinstance(requires_grad, bool):
        raise Malformed("unexpected arguments to Parameter")
    return torch.nn.Parameter(_tensor_arg(data, "a Parameter"), requires_grad)


def _rebuild_parameter(interp, data, requires_grad, hooks, state=None):
    import torch

    return torch.nn.Parameter(_tensor_arg(data, "a Parameter"), bool(requires_grad))


def _rebuild_from_type(interp, func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: a tensor (subclass) plus attribute state.

    The tensor is built through the interpreter's call rules; a subclass that is not
    installed (a placeholder type) is read as a plain tensor, and attribute state is dropped.
    """
    import torch

    ret = interp.call(func, args)
    if isinstance(ret, torch.Tensor) and isinstance(new_type, Placeholder):
        interp.notes.append(f"a tensor of class {new_type.of} was read as a plain tensor")
    return ret


def _ordered_dict(interp, items=()):
    return _pairs(interp, OrderedDict, items)


def _counter(interp, items=()):
    return _pairs(interp, Counter, items)


def _pairs(interp, kind, items):
    if isinstance(items, dict):
        items = list(items.items())
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, tuple) and len(p) == 2 for p in items):
        raise Malformed(f"{kind.__name__} built from {short(items)}")
    for k, _ in items:
        interp.check_key(k)
    return kind(items)


def _set_of(kind):
    def build(interp, items=()):
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise Malformed(f"{kind.__name__} built from {short(items)}")
        for item in items:
            interp.check_key(item)
        return interp.nested(kind(items), items) if kind is frozenset else kind(items)

    return build


def _latin1(encoding) -> bool:
    return isinstance(encoding, str) and encoding.lower().replace("_", "-") in ("latin1", "latin-1", "iso-8859-1")


def _codecs_encode(interp, text, encoding="utf-8", *rest):
    if rest or not isinstance(text, str) or not _latin1(encoding):
        raise Malformed("_codecs.encode is allowed only to turn latin-1 text into bytes")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise Malformed("_codecs.encode of text that is not latin-1") from None


def _bytearray(interp, data=b"", encoding=None):
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and _latin1(encoding):
        return bytearray(_codecs_encode(interp, data, encoding))
    raise Malformed(f"bytearray built from {short(data)}")


def _complex(interp, real=0.0, imag=0.0):
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (real, imag)):
        raise Malformed("complex built from non-numbers")
    if any(isinstance(x, int) and x.bit_length() > 1024 for x in (real, imag)):
        raise Malformed("complex built from an oversized integer")
    return complex(real, imag)


def _slice(interp, *args):
    if len(args) > 3 or not all(a is None or is_int(a) for a in args):
        raise Malformed("slice built from non-integers")
    return slice(*args)


def _size(interp, dims=()):
    import torch

    if not isinstance(dims, (tuple, list)) or not all(is_int(d) and d.bit_length() <= 63 for d in dims):
        raise Malformed(f"torch.Size built from {short(dims)}")
    return torch.Size(dims)


def _device(interp, kind, index=None):
    import torch

    if not isinstance(kind, str) or len(kind) > 64 or not (index is None or is_int(index) and 0 <= index < 1 << 16):
        raise Malformed("torch.device built from bad arguments")
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except RuntimeError:
        raise Malformed(f"unknown device {short(kind)}") from None


def _from_cpu_tensor(interp, data, dtype, device, requires_grad):
    t = _tensor_arg(data, "a device tensor")
    if t.dtype != dtype:
        raise Malformed("a device tensor's dtype disagrees with its data")
    return t


_SAFE_FUNCTIONS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _from_cpu_tensor,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch._tensor._rebuild_from_type": _rebuild_from_type,
    "torch.nn.parameter.Parameter": _parameter,
    "collections.OrderedDict": _ordered_dict,
    "collections.Counter": _counter,
    "torch.Size": _size,
    "torch.device": _device,
    "_codecs.encode": _codecs_encode,
    "builtins.bytearray": _bytearray,
    "builtins.set": _set_of(set),
    "builtins.frozenset": _set_of(frozenset),
    "builtins.complex": _complex,
    "builtins.slice": _slice,
}


@functools.lru_cache(maxsize=1)
def _storage_types() -> dict[str, StorageType]:
    import torch

    out = {}
    for dtype, cls in torch.storage._dtype_to_storage_type_map().items():
        name = str(dtype).removeprefix("torch.")
        out[f"torch.{cls}"] = StorageType(f"torch.{cls}", name, torch._utils._element_size(dtype))
    for qualname in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        out[qualname] = StorageType(qualname, "uint8", 1)
    return out


@functools.lru_cache(maxsize=1)
def _values() -> dict[str, object]:
    """Inert globals: dtypes, layouts and memory formats by name, ``torch.Tensor`` as a type marker."""
    import torch

    out: dict[str, object] = {}
    for name, value in list(vars(torch).items()):  # vars, not getattr: no lazy submodule imports
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            out[f"torch.{name}"] = value
    out["torch.Tensor"] = TypeRef("torch.Tensor")
    out["torch._tensor.Tensor"] = out["torch.Tensor"]
    return out


class Resolver:
    """Globals to values. ``calls=False`` (the scan): nothing callable, storage types only."""

    def __init__(self, path: str, calls: bool):
        self.path = path
        self.calls = calls
        self.storage_types = _storage_types()
        self.values = _values() if calls else {}
        self.placeholders: dict[str, Placeholder] = {}

    def __call__(self, module: str, name: str):
        qualname = printable(f"{module}.{name}")
        if refused_global(module, name):
            raise _unsafe(self.path, qualname)
        if qualname in self.storage_types:
            return self.storage_types[qualname]
        if self.calls:
            if qualname in _SAFE_FUNCTIONS:
                return Safe(qualname, _SAFE_FUNCTIONS[qualname])
            if qualname in self.values:
                return self.values[qualname]
        if qualname not in self.placeholders:
            self.placeholders[qualname] = Placeholder(qualname)
        return self.placeholders[qualname]
