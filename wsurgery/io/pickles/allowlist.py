"""Which globals a pickle may name, and what each becomes.

Invariants:

- a global on the refused list (:func:`refused_global`: code, the system, file loaders,
  dunder names) refuses the whole file with an UnsafePickleError, in the scan and in the
  restricted load alike, even when a placeholder would have done;
- in the scan (``Resolver(calls=False)``) a global is a storage type, an inert
  :class:`Placeholder`, or, for the torch functions and types whose calls allocate
  (tensor rebuilds, tensor and storage constructors, ``bytearray``), a check that builds
  nothing: it refuses a view larger than its storage, a tensor torch would allocate
  beyond its storage and the file, a constructor called with sizes, and returns an inert
  :class:`ScannedTensor`; a BUILD that would ``set_`` a tensor to a storage is checked
  the same way (:meth:`Resolver.on_build`). So nothing ``torch.load`` then runs
  allocates more than the file describes;
- in the restricted load (``calls=True``) the only callables are the entries of
  ``_SAFE_FUNCTIONS``: torch's rebuild functions and a few constructors, re-implemented
  here so that their arguments are checked (type, sign, size, bounds) before torch sees
  them; tensors are built only over a :class:`StorageRef`, a slice of the file's private
  mapping, and only as views that lie inside it;
- torch is imported inside the functions that need it, never when this module is.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, OrderedDict
from collections.abc import Callable

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


def _view(offset, size, stride) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """A strided view's ``(offset, size, stride)``, validated."""
    if not is_int(offset) or offset < 0 or offset.bit_length() > 62:
        raise Malformed(f"a tensor has storage offset {short(offset)}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise Malformed(f"a tensor has {len(size)} sizes but {len(stride)} strides")
    return offset, size, stride


def _shape(size) -> str:
    text = repr(tuple(size))
    return text if len(text) <= 80 else text[:77] + "..."


def _in_bounds(offset: int, size, stride, itemsize: int, held: int) -> None:
    """Refuse a view that reaches past the end of its storage.

    ``Tensor.set_`` grows a resizable storage to fit the view instead of failing (an empty
    one above all), so the check comes first, before anything is allocated."""
    if 0 in size:
        return
    need = (offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))) * itemsize
    if need > held:
        raise Malformed(
            f"a tensor view of shape {_shape(size)} at offset {offset} reaches {need} bytes into a storage of "
            f"{held} (a view larger than its storage)"
        )


def _set(storage, offset, size, stride, dtype=None):
    import torch

    if not isinstance(storage, StorageRef):
        raise Malformed(f"a tensor is rebuilt over {short(storage)}, not a storage")
    offset, size, stride = _view(offset, size, stride)
    dtype = dtype if dtype is not None else storage.dtype
    _in_bounds(offset, size, stride, dtype.itemsize, storage.untyped.nbytes())
    t = torch.empty((0,), dtype=dtype)
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

    if not isinstance(requires_grad, bool):
        raise Malformed(f"a Parameter's requires_grad is {short(requires_grad)}, not a bool")
    return torch.nn.Parameter(_tensor_arg(data, "a Parameter"), requires_grad)


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


# torch's typed storage classes -> (dtype name, element size); a fixed set since torch 2.0
# (``torch.storage._dtype_to_storage_type_map``; a test keeps the two equal). Static, so
# that the scan never imports torch.
_STORAGE_CLASSES = {
    "DoubleStorage": ("float64", 8), "FloatStorage": ("float32", 4), "HalfStorage": ("float16", 2),
    "LongStorage": ("int64", 8), "IntStorage": ("int32", 4), "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1), "ByteStorage": ("uint8", 1), "BoolStorage": ("bool", 1),
    "BFloat16Storage": ("bfloat16", 2), "ComplexDoubleStorage": ("complex128", 16),
    "ComplexFloatStorage": ("complex64", 8), "QInt8Storage": ("qint8", 1), "QInt32Storage": ("qint32", 4),
    "QUInt8Storage": ("quint8", 1), "QUInt4x2Storage": ("quint4x2", 1), "QUInt2x4Storage": ("quint2x4", 1),
}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _storage_types() -> dict[str, StorageType]:
    out = {f"torch.{cls}": StorageType(f"torch.{cls}", name, size) for cls, (name, size) in _STORAGE_CLASSES.items()}
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


# ----------------------------------------------------------------------------- the scan's checks


class ClaimedStorage(Placeholder):
    """A storage as the scan sees it: inert, with the bytes the file holds for it (a legacy
    storage view: the bytes of the view)."""

    __slots__ = ("nbytes", "itemsize", "key", "dtype_name")

    def __init__(self, nbytes: int, itemsize: int, key: str = "", dtype_name: str = ""):
        super().__init__("a storage")
        self.nbytes = nbytes
        self.itemsize = itemsize
        self.key = key
        self.dtype_name = dtype_name


class ScannedTensor(Placeholder):
    """A tensor as the scan sees it: inert, with its element count, element size and the
    bytes of the storage under it, which is what ``torch.load`` will allocate or view."""

    __slots__ = ("numel", "itemsize", "held", "plain")

    def __init__(self, of: str, numel: int, itemsize: int, held: int, args=()):
        super().__init__(of, called=True, args=args)
        self.numel = numel
        self.itemsize = itemsize
        self.held = held
        # A plain dense tensor rebuilt by ``_rebuild_tensor(_v2)`` over a typed storage,
        # with no metadata flags: ``(storage, offset, size, stride)``, read without torch.
        self.plain: tuple | None = None


_REBUILDS = ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2")
_PARAMETERS = ("torch.nn.parameter.Parameter", "torch._utils._rebuild_parameter",
               "torch._utils._rebuild_parameter_with_state")  # fmt: skip


# torch's legacy tensor classes (``torch._tensor_classes``) -> element size; static like
# the storage classes (a test keeps them equal to torch's).
_TENSOR_CLASSES = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1,
}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _constructors() -> dict[str, int]:
    """Types torch.load may call that allocate what their arguments ask for -> element size."""
    out = {}
    for prefix in ("torch.", "torch.cuda.", "torch.sparse.", "torch.cuda.sparse."):
        for kind, itemsize in _TENSOR_CLASSES.items():
            if not (kind == "Bool" and "sparse" in prefix):
                out[f"{prefix}{kind}Tensor"] = itemsize
    for name in ("torch.Tensor", "torch._tensor.Tensor", "torch.storage.TypedStorage", "torch.TypedStorage"):
        out[name] = 4
    return out


class _ScanChecks:
    """The scan's stand-ins for the torch calls that allocate: they check what torch.load
    would do with the arguments against the storages and the file, and build nothing."""

    def __init__(self, file_size: int):
        self.file_size = file_size

    def table(self) -> dict:
        table: dict[str, Callable] = {name: self.rebuild for name in _REBUILDS}
        table["torch._utils._rebuild_tensor_v3"] = self.rebuild_v3
        table["torch._utils._rebuild_qtensor"] = self.rebuild_qtensor
        table["torch._utils._rebuild_device_tensor_from_cpu_tensor"] = self.from_cpu
        table["torch._tensor._rebuild_from_type_v2"] = _rebuild_from_type
        table["torch._tensor._rebuild_from_type"] = _rebuild_from_type
        table["builtins.bytearray"] = _bytearray
        table["_codecs.encode"] = _codecs_encode
        for name in _PARAMETERS:
            table[name] = self.parameter
        for name, itemsize in _constructors().items():
            table[name] = functools.partial(self.constructor, name, itemsize)
        return table

    @staticmethod
    def _storage(x) -> ClaimedStorage:
        if not isinstance(x, ClaimedStorage):
            raise Malformed(f"a tensor is rebuilt over {short(x)}, not a storage")
        return x

    def _tensor(self, of: str, storage, offset, size, stride, itemsize: int) -> ScannedTensor:
        storage = self._storage(storage)
        offset, size, stride = _view(offset, size, stride)
        _in_bounds(offset, size, stride, itemsize, storage.nbytes)
        return ScannedTensor(of, math.prod(size), itemsize, storage.nbytes)

    def _fits(self, t: ScannedTensor, itemsize: int) -> None:
        """Refuse a tensor that torch would allocate whole when it takes more bytes than both
        its storage and the file (a stride-0 view materialised: a size bomb)."""
        nbytes = t.numel * itemsize
        if nbytes > max(t.held, self.file_size):
            raise Malformed(
                f"a tensor of {t.numel} elements would take {nbytes} bytes, more than its {t.held}-byte storage "
                f"and the {self.file_size}-byte file (a size bomb)"
            )

    def rebuild(self, interp, storage, offset, size, stride, *rest):
        t = self._tensor("a tensor", storage, offset, size, stride, self._storage(storage).itemsize)
        flags = rest[2] if len(rest) > 2 else None  # _rebuild_tensor_v2's metadata
        if len(rest) <= 3 and not flags:
            t.plain = (storage, *_view(offset, size, stride))
        return t

    def rebuild_v3(self, interp, storage, offset, size, stride, requires_grad=False, hooks=None, dtype=None, *rest):
        return self._tensor("a tensor", storage, offset, size, stride, _itemsize(dtype))

    def rebuild_qtensor(self, interp, storage, offset, size, stride, *rest):
        t = self.rebuild(interp, storage, offset, size, stride)
        t.plain = None
        self._fits(t, t.itemsize)  # torch allocates the whole tensor, then views the storage
        return t

    def from_cpu(self, interp, data, dtype=None, *rest):
        if isinstance(data, ScannedTensor):
            self._fits(data, _itemsize(dtype))  # .to(dtype) materialises a view
        return data

    def parameter(self, interp, data=None, *rest):
        return data if isinstance(data, ScannedTensor) else ScannedTensor("a Parameter", 0, 4, 0)

    def constructor(self, qualname: str, itemsize: int, interp, *args):
        if not args:
            return ScannedTensor(qualname, 0, itemsize, 0)
        if len(args) == 1 and isinstance(args[0], ClaimedStorage):
            held = args[0].nbytes
            return ScannedTensor(qualname, held // itemsize, itemsize, held)
        raise Malformed(
            f"the pickle calls {qualname} with arguments {short(args[0])}...: torch.save never writes that, "
            "and torch.load would allocate whatever they ask for"
        )

    def on_build(self, inst, state) -> None:
        """BUILD on a tensor is ``tensor.set_(*state)`` in torch.load: check the view first."""
        if not (isinstance(state, tuple) and state and isinstance(state[0], ClaimedStorage)):
            return
        storage = state[0]
        itemsize = inst.itemsize if isinstance(inst, ScannedTensor) else storage.itemsize
        size: tuple[int, ...]
        stride: tuple[int, ...]
        if len(state) == 1:
            size, stride, offset = (storage.nbytes // itemsize,), (1,), 0
        elif len(state) in (3, 4):
            offset, size = state[1], state[2]
            stride = state[3] if len(state) == 4 and state[3] != () else _contiguous(size)
        else:
            raise Malformed(f"a BUILD sets a tensor to a storage with {len(state)} arguments")
        t = self._tensor("a tensor", storage, offset, size, stride, itemsize)
        if isinstance(inst, ScannedTensor):
            inst.numel, inst.held = t.numel, t.held


def _contiguous(size) -> tuple[int, ...]:
    size = _ints(size, "size")
    stride, acc = [], 1
    for n in reversed(size):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _itemsize(dtype) -> int:
    if isinstance(dtype, Placeholder):  # the scan names dtypes without resolving them
        from ...dtypes import BY_NAME

        known = BY_NAME.get(dtype.of.removeprefix("torch.")) if dtype.of.startswith("torch.") else None
        if known is not None:
            return known.itemsize
        dtype = _values().get(dtype.of)
    import torch

    if not isinstance(dtype, torch.dtype):
        raise Malformed(f"a tensor's dtype is {short(dtype)}")
    return dtype.itemsize


class Resolver:
    """Globals to values. ``calls=False`` (the scan): storage types, placeholders, and the
    checks of :class:`_ScanChecks` for the calls torch.load would allocate in."""

    def __init__(self, path: str, calls: bool, file_size: int = 0):
        self.path = path
        self.calls = calls
        self.storage_types = _storage_types()
        self.values = _values() if calls else {}
        scan = None if calls else _ScanChecks(file_size)
        self.checks = {} if scan is None else scan.table()
        self.on_build = None if scan is None else scan.on_build
        self.placeholders: dict[str, Placeholder] = {}
        self.named: set[str] = set()  # every global the pickle named

    def __call__(self, module: str, name: str):
        qualname = printable(f"{module}.{name}")
        self.named.add(qualname)
        if refused_global(module, name):
            raise _unsafe(self.path, qualname)
        if qualname in self.storage_types:
            return self.storage_types[qualname]
        if self.calls:
            if qualname in _SAFE_FUNCTIONS:
                return Safe(qualname, _SAFE_FUNCTIONS[qualname])
            if qualname in self.values:
                return self.values[qualname]
        elif qualname in self.checks:
            return Safe(qualname, self.checks[qualname])
        if qualname not in self.placeholders:
            self.placeholders[qualname] = Placeholder(qualname)
        return self.placeholders[qualname]
