"""torch.save files, loaded without ever executing pickled code.

Every torch file goes through three steps; nothing is allocated, imported or called
before the first has passed.

1. **Scan.** The pickle is read by wsurgery's own opcode interpreter (:class:`_Unpickler`)
   with *no* callables: every global becomes an inert :class:`Placeholder`, calling one
   gives another placeholder, nothing is imported. The scan records the globals the
   pickle names and the storages it claims, and refuses:

   - a global on the refused list (:func:`refused_global`: ``os``, ``posix``,
     ``subprocess``, ``sys``, ``builtins.eval`` / ``exec`` / ``compile`` / ``getattr`` /
     ``open`` / ``__import__`` ...): :class:`UnsafePickleError` (exit 3) naming it, even
     when the file holds tensors too, because no honest checkpoint needs one;
   - a storage claim that the file cannot back: its zip entry is missing, compressed,
     outside the file, or not exactly ``numel x itemsize`` bytes (legacy files: the size
     record after the pickle disagrees, or the data runs past the end);
   - a zip archive whose entries overlap, repeat a name, are encrypted, claim more than
     they can inflate to, or that Python's and torch's zip readers see differently;
   - a dict key or set member nested deeper than ``MAX_KEY_DEPTH`` (hashing it would
     overflow the C stack and kill the process, in torch's unpickler as in ours);
   - anything malformed (truncated data, unknown opcodes, stack underflow): InputError.

2. **torch.load.** ``torch.load(weights_only=True, mmap=True)`` for zip files (tensor data
   stays in the page cache), ``weights_only=True`` for legacy files.

3. **Fallback.** When torch's allow-list refuses a global that the scan found harmless (a
   config object of a class that is not installed, a callback's state, a whole pickled
   ``nn.Module``, a pickle protocol above 2), the same interpreter loads the file again,
   now with an explicit allow-list of torch's tensor rebuild functions (re-implemented
   here with validated arguments) and of a few inert types (``OrderedDict``,
   ``torch.Size``, dtypes, storage types). Unknown globals stay placeholders; a REDUCE /
   NEWOBJ / BUILD on a placeholder yields or fills a placeholder; REDUCE on anything that
   is neither a placeholder nor an allow-listed function is an error. Tensors are rebuilt
   over a private (copy-on-write) memory map of the file, so the input is never
   modified. Legacy-format files take the same route.

The state dict is the top-level dict of tensors, or the dict found under ``state_dict`` /
``model`` / ``module`` (Lightning, DeepSpeed-style checkpoints); a pickled ``nn.Module``
(a placeholder holding ``_parameters`` / ``_buffers`` / ``_modules``) yields its
``state_dict()``. Entries that are not tensors are reported in ``PickleResult.skipped``
(``hyper_parameters: placeholder for my_pkg.Config``). A tensor that is a view claiming
more bytes than both its storage and the file (a stride-0 size bomb) is refused.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import mmap
import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from ...errors import InputError, UnsafePickleError, WsurgeryError

STATE_DICT_KEYS = ("state_dict", "model", "module")
MAX_KEY_DEPTH = 64  # nesting allowed in a dict key / set member
MAX_INFLATED_RECORD = 256 << 20  # a compressed (non-tensor) zip entry may inflate to at most this
_DEFLATE_MAX_RATIO = 1032  # deflate cannot inflate more than this per compressed byte
_MAX_GLOBAL_LINE = 4096
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass
class PickleResult:
    tensors: dict  # name -> torch.Tensor, in file order
    skipped: list[str] = field(default_factory=list)  # what was not a tensor, one line each
    container: str | None = None  # the key the state dict was found under, if any
    route: str = "torch.load(weights_only=True)"  # or "restricted unpickler (...)"


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


def _canonical(module: str, name: str) -> tuple[str, str]:
    """Python 2 spellings (``__builtin__``, ``copy_reg``) as Python 3 names them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


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
    module, name = _canonical(module, name)
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


# ----------------------------------------------------------------------------- inert values


class Placeholder:
    """An inert stand-in for a global wsurgery does not import, or for what calling,
    constructing or building it would have produced. It never runs anything: the
    interpreter records arguments, state and items on it, and that is all."""

    __slots__ = ("of", "called", "args", "state", "items", "keys")

    def __init__(self, of: str, called: bool = False, args=()):
        self.of = of
        self.called = called
        self.args = args
        self.state = None
        self.items: list = []
        self.keys: dict = {}

    def __repr__(self) -> str:
        return f"<placeholder for {self.of}>"


@dataclass(frozen=True)
class _StorageType:
    """A storage class named by a pickle (``torch.FloatStorage``): its element type."""

    qualname: str
    dtype_name: str  # torch dtype name without prefix
    itemsize: int


@dataclass(frozen=True)
class _TypeRef:
    """A type that may be named but never called (``torch.Tensor``: its constructor allocates)."""

    qualname: str


class _Safe:
    """An allow-listed callable: a wrapper that validates its arguments, then builds the value."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        self.qualname = qualname
        self.fn = fn

    def __repr__(self) -> str:
        return f"<allowed {self.qualname}>"


@dataclass(frozen=True)
class _Claim:
    """A storage the pickle asks for: ``key`` with ``nbytes`` of ``dtype_name``."""

    key: str
    dtype_name: str
    itemsize: int
    nbytes: int
    view: tuple | None = None  # legacy (view_key, offset, numel)


class _Malformed(Exception):
    """Internal: the pickle breaks a rule; turned into an InputError naming the file."""


def _printable(text: str, limit: int = 200) -> str:
    """Attacker-chosen text made fit for one line of a terminal: escapes, bounded length."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


def _short(x, limit: int = 60) -> str:
    """A bounded, always-formattable description of an attacker-chosen value."""
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, int):
        return repr(x) if x.bit_length() <= 64 else f"<{x.bit_length()}-bit integer>"
    if isinstance(x, (str, bytes)):
        return repr(x[:limit]) + ("..." if len(x) > limit else "")
    if isinstance(x, (Placeholder, _Safe, _StorageType, _TypeRef)):
        return repr(x)
    return type(x).__name__


# ----------------------------------------------------------------------------- byte sources


class _Source:
    """Bounded reads over a buffer (bytes, or a read-only memory map of the file): a read
    never asks for more than is left, so a length field cannot make anything allocate."""

    def __init__(self, data, start: int = 0):
        self.data = data
        self.pos = start
        self.end = len(data)

    def truncated(self, n) -> _Malformed:
        return _Malformed(f"truncated pickle: needs {_short(n)} bytes at byte {self.pos}, {self.end - self.pos} left")

    def read(self, n: int) -> bytes:
        pos = self.pos
        if n < 0 or n > self.end - pos:
            raise self.truncated(n)
        self.pos = pos + n
        return self.data[pos : pos + n]

    def byte(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise self.truncated(1)
        self.pos = pos + 1
        return self.data[pos]

    def unpack(self, fmt: struct.Struct):
        pos = self.pos
        if fmt.size > self.end - pos:
            raise self.truncated(fmt.size)
        self.pos = pos + fmt.size
        return fmt.unpack_from(self.data, pos)[0]

    def readline(self) -> bytes:
        i = self.data.find(b"\n", self.pos, min(self.end, self.pos + _MAX_GLOBAL_LINE))
        if i < 0:
            raise _Malformed(f"unterminated name line at byte {self.pos}")
        return self.read(i + 1 - self.pos)


_I4, _U4, _U8, _U2, _F8 = (struct.Struct(f) for f in ("<i", "<I", "<Q", "<H", ">d"))


# ----------------------------------------------------------------------------- the interpreter

_OPS: dict[int, str] = {}


def _op(code: bytes):
    def deco(fn):
        _OPS[code[0]] = fn.__name__
        return fn

    return deco


class _Unpickler:
    """A pickle opcode interpreter that never imports a module nor calls a function
    it was not given.

    ``resolve(module, name)`` turns a global into a value (a placeholder, an inert marker,
    or a :class:`_Safe` wrapper); ``persistent(pid)`` turns a persistent id into a
    storage. REDUCE / NEWOBJ call only :class:`_Safe` wrappers; on a placeholder they give
    a placeholder; on anything else they are an error. BUILD, APPEND and SETITEM fill
    placeholders and plain containers only. Protocols 2 to 5 are read, without the
    text opcodes of protocols 0/1, extension codes and out-of-band buffers.
    """

    def __init__(self, src: _Source, resolve, persistent):
        self.src = src
        self.resolve = resolve
        self.persistent = persistent
        self.memo: dict = {}
        self.stack: list = []
        self.metastack: list = []
        self.notes: list[str] = []
        self._depth: dict[int, int] = {}  # id(tuple/frozenset) -> nesting depth
        self._alive: list = []  # keeps the objects of _depth alive, so ids stay unique

    # -- helpers --------------------------------------------------------------------
    def load(self):
        """Interpret up to STOP. Any failure is a :class:`_Malformed` (or the resolver's
        :class:`UnsafePickleError`): a hostile pickle may make a rebuild raise anything."""
        try:
            return self._run()
        except (_Malformed, WsurgeryError, MemoryError):
            raise
        except RecursionError:
            raise _Malformed("the pickle nests too deeply") from None
        except Exception as exc:  # noqa: BLE001
            raise _Malformed(f"{type(exc).__name__}: {_first_line(exc)}") from None

    def _run(self):
        src = self.src
        table = [None] * 256
        for code, name in _OPS.items():
            table[code] = getattr(self, name)
        while True:
            code = src.byte()
            handler = table[code]
            if handler is None:
                raise _Malformed(f"unsupported pickle opcode 0x{code:02x} at byte {src.pos - 1}")
            if handler() is _STOP:
                if len(self.stack) != 1 or self.metastack:
                    raise _Malformed("the pickle's stack is not balanced at STOP")
                return self.stack.pop()

    def pop_mark(self) -> list:
        items = self.stack
        if not self.metastack:
            raise _Malformed("a container opcode without its MARK")
        self.stack = self.metastack.pop()
        return items

    def pop(self):
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack[-1]

    def depth(self, x) -> int:
        if type(x) in _NESTING:
            return self._depth.get(id(x), 1)
        return 0

    def nested(self, obj, items) -> object:
        """Record how deep a new tuple or frozenset nests (only when it holds another)."""
        inner = [self._depth.get(id(i), 1) for i in items if type(i) in _NESTING]
        if inner:
            self._depth[id(obj)] = 1 + max(inner)
            self._alive.append(obj)
        return obj

    def check_key(self, key) -> None:
        if isinstance(key, (list, dict, set, bytearray)):
            raise _Malformed(f"a dict key or set member is an unhashable {type(key).__name__}")
        if self.depth(key) > MAX_KEY_DEPTH:
            raise _Malformed(f"a dict key or set member is nested more than {MAX_KEY_DEPTH} deep")

    def call(self, func, args, kwargs=None):
        if not isinstance(args, tuple):
            raise _Malformed(f"call arguments are a {type(args).__name__}, not a tuple")
        if isinstance(func, Placeholder):
            return Placeholder(func.of, called=True, args=args)
        if isinstance(func, _Safe):
            if kwargs:
                raise _Malformed(f"keyword arguments to {func.qualname}")
            return func.fn(self, *args)
        raise _Malformed(f"the pickle calls {_short(func)}, which is not an allowed function")

    def text(self, raw: bytes, *, strict: bool = False):
        try:
            return raw.decode("utf-8", "strict" if strict else "surrogatepass")
        except UnicodeDecodeError:
            if strict:
                raise _Malformed("a name is not UTF-8") from None
            return raw

    def global_(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Malformed("a global's module and name must be strings")
        module, name = _canonical(module, name)
        self.stack.append(self.resolve(module, name))

    # -- protocol and framing -------------------------------------------------------
    @_op(pickle.PROTO)
    def op_proto(self):
        proto = self.src.byte()
        if not 2 <= proto <= 5:
            raise _Malformed(f"pickle protocol {proto} (only 2 to 5 are read)")

    @_op(pickle.FRAME)
    def op_frame(self):
        n = self.src.unpack(_U8)
        if n > self.src.end - self.src.pos:
            raise _Malformed("a frame runs past the end of the pickle")

    @_op(pickle.STOP)
    def op_stop(self):
        return _STOP

    # -- constants ------------------------------------------------------------------
    @_op(pickle.NONE)
    def op_none(self):
        self.stack.append(None)

    @_op(pickle.NEWTRUE)
    def op_true(self):
        self.stack.append(True)

    @_op(pickle.NEWFALSE)
    def op_false(self):
        self.stack.append(False)

    @_op(pickle.BININT)
    def op_binint(self):
        self.stack.append(self.src.unpack(_I4))

    @_op(pickle.BININT1)
    def op_binint1(self):
        self.stack.append(self.src.byte())

    @_op(pickle.BININT2)
    def op_binint2(self):
        self.stack.append(self.src.unpack(_U2))

    @_op(pickle.LONG1)
    def op_long1(self):
        n = self.src.byte()
        self.stack.append(int.from_bytes(self.src.read(n), "little", signed=True))

    @_op(pickle.LONG4)
    def op_long4(self):
        n = self.src.unpack(_I4)
        if n < 0:
            raise _Malformed("LONG4 with a negative length")
        self.stack.append(int.from_bytes(self.src.read(n), "little", signed=True))

    @_op(pickle.BINFLOAT)
    def op_binfloat(self):
        self.stack.append(self.src.unpack(_F8))

    # -- strings and bytes ----------------------------------------------------------
    @_op(pickle.SHORT_BINSTRING)
    def op_short_binstring(self):
        self.stack.append(self.text(self.src.read(self.src.byte())))

    @_op(pickle.BINSTRING)
    def op_binstring(self):
        n = self.src.unpack(_I4)
        if n < 0:
            raise _Malformed("BINSTRING with a negative length")
        self.stack.append(self.text(self.src.read(n)))

    @_op(pickle.SHORT_BINUNICODE)
    def op_short_binunicode(self):
        self.stack.append(self.src.read(self.src.byte()).decode("utf-8", "surrogatepass"))

    @_op(pickle.BINUNICODE)
    def op_binunicode(self):
        self.stack.append(self.src.read(self.src.unpack(_U4)).decode("utf-8", "surrogatepass"))

    @_op(pickle.BINUNICODE8)
    def op_binunicode8(self):
        self.stack.append(self.src.read(self.src.unpack(_U8)).decode("utf-8", "surrogatepass"))

    @_op(pickle.SHORT_BINBYTES)
    def op_short_binbytes(self):
        self.stack.append(self.src.read(self.src.byte()))

    @_op(pickle.BINBYTES)
    def op_binbytes(self):
        self.stack.append(self.src.read(self.src.unpack(_U4)))

    @_op(pickle.BINBYTES8)
    def op_binbytes8(self):
        self.stack.append(self.src.read(self.src.unpack(_U8)))

    @_op(pickle.BYTEARRAY8)
    def op_bytearray8(self):
        self.stack.append(bytearray(self.src.read(self.src.unpack(_U8))))

    # -- containers -----------------------------------------------------------------
    @_op(pickle.EMPTY_TUPLE)
    def op_empty_tuple(self):
        self.stack.append(())

    @_op(pickle.EMPTY_LIST)
    def op_empty_list(self):
        self.stack.append([])

    @_op(pickle.EMPTY_DICT)
    def op_empty_dict(self):
        self.stack.append({})

    @_op(pickle.EMPTY_SET)
    def op_empty_set(self):
        self.stack.append(set())

    @_op(pickle.MARK)
    def op_mark(self):
        self.metastack.append(self.stack)
        self.stack = []

    @_op(pickle.TUPLE)
    def op_tuple(self):
        items = tuple(self.pop_mark())
        self.stack.append(self.nested(items, items))

    @_op(pickle.TUPLE1)
    def op_tuple1(self):
        items = (self.pop(),)
        self.stack.append(self.nested(items, items))

    @_op(pickle.TUPLE2)
    def op_tuple2(self):
        b, a = self.pop(), self.pop()
        items = (a, b)
        self.stack.append(self.nested(items, items))

    @_op(pickle.TUPLE3)
    def op_tuple3(self):
        c, b, a = self.pop(), self.pop(), self.pop()
        items = (a, b, c)
        self.stack.append(self.nested(items, items))

    @_op(pickle.LIST)
    def op_list(self):
        self.stack.append(self.pop_mark())

    @_op(pickle.DICT)
    def op_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise _Malformed("DICT with an odd number of items")
        out = {}
        for i in range(0, len(items), 2):
            self.check_key(items[i])
            out[items[i]] = items[i + 1]
        self.stack.append(out)

    @_op(pickle.FROZENSET)
    def op_frozenset(self):
        items = self.pop_mark()
        for item in items:
            self.check_key(item)
        self.stack.append(self.nested(frozenset(items), items))

    @_op(pickle.APPEND)
    def op_append(self):
        item = self.pop()
        self._extend(self.top(), [item])

    @_op(pickle.APPENDS)
    def op_appends(self):
        items = self.pop_mark()
        self._extend(self.top(), items)

    def _extend(self, target, items) -> None:
        if type(target) is list:
            target.extend(items)
        elif isinstance(target, Placeholder):
            target.items.extend(items)
        else:
            raise _Malformed(f"APPEND to a {_short(target)}")

    @_op(pickle.SETITEM)
    def op_setitem(self):
        value, key = self.pop(), self.pop()
        self._setitems(self.top(), [key, value])

    @_op(pickle.SETITEMS)
    def op_setitems(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise _Malformed("SETITEMS with an odd number of items")
        self._setitems(self.top(), items)

    def _setitems(self, target, items) -> None:
        for i in range(0, len(items), 2):
            self.check_key(items[i])
        if type(target) in (dict, OrderedDict, Counter):
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        elif isinstance(target, Placeholder):
            for i in range(0, len(items), 2):
                target.keys[items[i]] = items[i + 1]
        else:
            raise _Malformed(f"SETITEM on a {_short(target)}")

    @_op(pickle.ADDITEMS)
    def op_additems(self):
        items = self.pop_mark()
        target = self.top()
        for item in items:
            self.check_key(item)
        if type(target) is set:
            target.update(items)
        elif isinstance(target, Placeholder):
            target.items.extend(items)
        else:
            raise _Malformed(f"ADDITEMS on a {_short(target)}")

    # -- stack and memo -------------------------------------------------------------
    @_op(pickle.POP)
    def op_pop(self):
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    @_op(pickle.POP_MARK)
    def op_pop_mark(self):
        self.pop_mark()

    @_op(pickle.DUP)
    def op_dup(self):
        self.stack.append(self.top())

    @_op(pickle.BINGET)
    def op_binget(self):
        self._get(self.src.byte())

    @_op(pickle.LONG_BINGET)
    def op_long_binget(self):
        self._get(self.src.unpack(_U4))

    def _get(self, i: int) -> None:
        if i not in self.memo:
            raise _Malformed(f"memo entry {i} read before it was written")
        self.stack.append(self.memo[i])

    @_op(pickle.BINPUT)
    def op_binput(self):
        self.memo[self.src.byte()] = self.top()

    @_op(pickle.LONG_BINPUT)
    def op_long_binput(self):
        self.memo[self.src.unpack(_U4)] = self.top()

    @_op(pickle.MEMOIZE)
    def op_memoize(self):
        self.memo[len(self.memo)] = self.top()

    # -- the risky ones: globals, calls, state --------------------------------------
    @_op(pickle.GLOBAL)
    def op_global(self):
        module = self.text(self.src.readline()[:-1], strict=True)
        name = self.text(self.src.readline()[:-1], strict=True)
        self.global_(module, name)

    @_op(pickle.STACK_GLOBAL)
    def op_stack_global(self):
        name, module = self.pop(), self.pop()
        self.global_(module, name)

    @_op(pickle.REDUCE)
    def op_reduce(self):
        args = self.pop()
        func = self.pop()
        self.stack.append(self.call(func, args))

    @_op(pickle.NEWOBJ)
    def op_newobj(self):
        args = self.pop()
        cls = self.pop()
        self.stack.append(self.call(cls, args))

    @_op(pickle.NEWOBJ_EX)
    def op_newobj_ex(self):
        kwargs, args, cls = self.pop(), self.pop(), self.pop()
        if not isinstance(kwargs, dict):
            raise _Malformed("NEWOBJ_EX keyword arguments are not a dict")
        self.stack.append(self.call(cls, args, kwargs))

    @_op(pickle.BUILD)
    def op_build(self):
        state = self.pop()
        inst = self.top()
        if isinstance(inst, Placeholder):
            inst.state = state
        # Pickled attribute state of anything else (a Parameter's extra attributes, an
        # OrderedDict's __dict__) is dropped: setting attributes is how gadgets start.

    @_op(pickle.BINPERSID)
    def op_binpersid(self):
        pid = self.pop()
        self.stack.append(self.persistent(pid))


_STOP = object()
_NESTING = (tuple, frozenset)


# ----------------------------------------------------------------------------- the allow-list


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(_is_int(d) for d in x):
        raise _Malformed(f"a tensor's {what} is not a sequence of integers: {_short(x)}")
    if any(d < 0 or d.bit_length() > 62 for d in x):
        raise _Malformed(f"a tensor's {what} holds a negative or oversized value")
    return tuple(x)


class _StorageRef:
    """A storage rebuilt over the file: an untyped slice of the private mapping, and its dtype."""

    __slots__ = ("untyped", "dtype")

    def __init__(self, untyped, dtype):
        self.untyped = untyped
        self.dtype = dtype


def _set(storage, offset, size, stride, dtype=None):
    import torch

    if not isinstance(storage, _StorageRef):
        raise _Malformed(f"a tensor is rebuilt over {_short(storage)}, not a storage")
    if not _is_int(offset) or offset < 0 or offset.bit_length() > 62:
        raise _Malformed(f"a tensor has storage offset {_short(offset)}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise _Malformed(f"a tensor has {len(size)} sizes but {len(stride)} strides")
    t = torch.empty((0,), dtype=dtype if dtype is not None else storage.dtype)
    return t.set_(storage.untyped, offset, size, stride)


def _metadata(interp, t, metadata):
    if metadata:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items()
        ):
            raise _Malformed("a tensor's metadata is not a dict of flags")
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
        raise _Malformed(f"a tensor's dtype is {_short(dtype)}")
    if isinstance(storage, _StorageRef) and storage.dtype != torch.uint8:
        raise _Malformed("_rebuild_tensor_v3 over a typed storage")
    return _metadata(interp, _set(storage, offset, size, stride, dtype), metadata)


def _tensor_arg(x, what: str):
    import torch

    if not isinstance(x, torch.Tensor):
        raise _Malformed(f"{what} of a {_short(x)}, not a tensor")
    return x


def _parameter(interp, data=None, requires_grad=True, *rest):
    import torch

    if data is None:
        data = torch.empty(0)
    if rest or not isinstance(requires_grad, bool):
        raise _Malformed("unexpected arguments to Parameter")
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
        raise _Malformed(f"{kind.__name__} built from {_short(items)}")
    for k, _ in items:
        interp.check_key(k)
    return kind(items)


def _set_of(kind):
    def build(interp, items=()):
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise _Malformed(f"{kind.__name__} built from {_short(items)}")
        for item in items:
            interp.check_key(item)
        return interp.nested(kind(items), items) if kind is frozenset else kind(items)

    return build


def _latin1(encoding) -> bool:
    return isinstance(encoding, str) and encoding.lower().replace("_", "-") in ("latin1", "latin-1", "iso-8859-1")


def _codecs_encode(interp, text, encoding="utf-8", *rest):
    if rest or not isinstance(text, str) or not _latin1(encoding):
        raise _Malformed("_codecs.encode is allowed only to turn latin-1 text into bytes")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise _Malformed("_codecs.encode of text that is not latin-1") from None


def _bytearray(interp, data=b"", encoding=None):
    if isinstance(data, (bytes, bytearray)) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and _latin1(encoding):
        return bytearray(_codecs_encode(interp, data, encoding))
    raise _Malformed(f"bytearray built from {_short(data)}")


def _complex(interp, real=0.0, imag=0.0):
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (real, imag)):
        raise _Malformed("complex built from non-numbers")
    if any(isinstance(x, int) and x.bit_length() > 1024 for x in (real, imag)):
        raise _Malformed("complex built from an oversized integer")
    return complex(real, imag)


def _slice(interp, *args):
    if len(args) > 3 or not all(a is None or _is_int(a) for a in args):
        raise _Malformed("slice built from non-integers")
    return slice(*args)


def _size(interp, dims=()):
    import torch

    if not isinstance(dims, (tuple, list)) or not all(_is_int(d) and d.bit_length() <= 63 for d in dims):
        raise _Malformed(f"torch.Size built from {_short(dims)}")
    return torch.Size(dims)


def _device(interp, kind, index=None):
    import torch

    if not isinstance(kind, str) or len(kind) > 64 or not (index is None or _is_int(index) and 0 <= index < 1 << 16):
        raise _Malformed("torch.device built from bad arguments")
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except RuntimeError:
        raise _Malformed(f"unknown device {_short(kind)}") from None


def _from_cpu_tensor(interp, data, dtype, device, requires_grad):
    t = _tensor_arg(data, "a device tensor")
    if t.dtype != dtype:
        raise _Malformed("a device tensor's dtype disagrees with its data")
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
def _storage_types() -> dict[str, _StorageType]:
    import torch

    out = {}
    for dtype, cls in torch.storage._dtype_to_storage_type_map().items():
        name = str(dtype).removeprefix("torch.")
        out[f"torch.{cls}"] = _StorageType(f"torch.{cls}", name, torch._utils._element_size(dtype))
    for qualname in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        out[qualname] = _StorageType(qualname, "uint8", 1)
    return out


@functools.lru_cache(maxsize=1)
def _values() -> dict[str, object]:
    """Inert globals: dtypes, layouts and memory formats by name, ``torch.Tensor`` as a type marker."""
    import torch

    out: dict[str, object] = {}
    for name, value in list(vars(torch).items()):  # vars, not getattr: no lazy submodule imports
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            out[f"torch.{name}"] = value
    out["torch.Tensor"] = _TypeRef("torch.Tensor")
    out["torch._tensor.Tensor"] = out["torch.Tensor"]
    return out


class _Resolver:
    """Globals to values. ``calls=False`` (the scan): nothing callable, storage types only."""

    def __init__(self, path: str, calls: bool):
        self.path = path
        self.calls = calls
        self.storage_types = _storage_types()
        self.values = _values() if calls else {}
        self.placeholders: dict[str, Placeholder] = {}

    def __call__(self, module: str, name: str):
        qualname = _printable(f"{module}.{name}")
        if refused_global(module, name):
            raise _unsafe(self.path, qualname)
        if qualname in self.storage_types:
            return self.storage_types[qualname]
        if self.calls:
            if qualname in _SAFE_FUNCTIONS:
                return _Safe(qualname, _SAFE_FUNCTIONS[qualname])
            if qualname in self.values:
                return self.values[qualname]
        if qualname not in self.placeholders:
            self.placeholders[qualname] = Placeholder(qualname)
        return self.placeholders[qualname]


# ----------------------------------------------------------------------------- storage claims


def _claim(pid, legacy: bool) -> _Claim | None:
    """Validate a persistent id; ``None`` for a legacy ``module`` id (source of a pickled class)."""
    if not isinstance(pid, tuple) or not pid:
        raise _Malformed(f"a persistent id is a {_short(pid)}, not a tuple")
    kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
    if legacy and kind == "module":
        return None
    if kind != "storage":
        raise _Malformed(f"a persistent id of kind {_short(kind)} (only storages are read)")
    if len(pid) != (6 if legacy else 5):
        raise _Malformed(f"a storage persistent id has {len(pid)} fields")
    stype, key, location, numel = pid[1:5]
    if not isinstance(stype, _StorageType):
        raise _Malformed(f"a storage of unknown type {_short(stype)}")
    if not isinstance(key, str) or not key or len(key) > 256:
        raise _Malformed(f"a storage key {_short(key)}")
    if not isinstance(location, (str, bytes)):
        raise _Malformed(f"a storage location {_short(location)}")
    if not _is_int(numel) or numel < 0 or numel.bit_length() > 62:
        raise _Malformed(f"storage {key!r} claims {_short(numel)} elements")
    view = None
    if legacy and pid[5] is not None:
        v = pid[5]
        if not (isinstance(v, tuple) and len(v) == 3 and isinstance(v[0], str) and _is_int(v[1]) and _is_int(v[2])):
            raise _Malformed(f"storage {key!r} has a malformed view record")
        if v[1] < 0 or v[2] < 0 or v[1] + v[2] > numel:
            raise _Malformed(f"storage view {_short(v[0])} lies outside storage {key!r}")
        view = v
    return _Claim(key, stype.dtype_name, stype.itemsize, numel * stype.itemsize, view)


class _Claims:
    """The persistent-id hook of the scan: records every storage the pickle asks for."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.by_key: dict[str, _Claim] = {}

    def __call__(self, pid):
        claim = _claim(pid, self.legacy)
        if claim is None:
            return Placeholder("a pickled module's source")
        seen = self.by_key.get(claim.key)
        if seen is not None and (seen.nbytes, seen.dtype_name) != (claim.nbytes, claim.dtype_name):
            raise _Malformed(f"storage {claim.key!r} is claimed twice with different sizes or types")
        self.by_key.setdefault(claim.key, claim)
        return Placeholder("a storage")


# ----------------------------------------------------------------------------- archives


@dataclass
class _Layout:
    """Where a torch file's pieces lie, validated: the pickle and each storage's bytes."""

    path: str
    size: int
    zip: bool
    pickle_bytes: bytes | None  # zip: data.pkl; legacy: read on demand from pickle_span
    pickle_span: tuple[int, int]  # legacy: [start, end) of the main pickle in the file
    records: dict[str, tuple[int, int]]  # storage key -> (absolute offset, nbytes)
    claims: dict[str, _Claim]
    big_endian: bool
    placeholders: list[str]  # globals the scan saw that are not allow-listed by torch


def _bad(path, rule: str) -> InputError:
    return InputError(
        f"{path}: invalid torch checkpoint: {rule}", hint="the file is corrupt or was not written by torch.save"
    )


def _scan(path: str, src: _Source, claims: _Claims):
    """Run the inert interpreter over one pickle; returns (value, resolver)."""
    resolver = _Resolver(path, calls=False)
    try:
        value = _Unpickler(src, resolver, claims).load()
    except _Malformed as exc:
        raise _bad(path, str(exc)) from None
    except (RecursionError, MemoryError):
        raise _bad(path, "the pickle is too deeply nested or too large") from None
    return value, resolver


def _local_data_offset(f, info: zipfile.ZipInfo, size: int, path) -> int:
    if info.header_offset < 0 or info.header_offset + 30 > size:
        raise _bad(path, f"zip entry {_short(info.filename)} starts outside the file")
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise _bad(path, f"zip entry {_short(info.filename)} has no local header")
    n, m = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + n + m


def _zip_layout(path: str, size: int) -> _Layout:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error,
            NotImplementedError, KeyError, IndexError, OverflowError) as exc:  # fmt: skip
        raise _bad(path, f"not a readable zip archive ({_first_line(exc)})") from None
    with zf, open(path, "rb") as f:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _bad(path, f"zip entry {_short(dup)} appears twice")
        spans = []
        entries: dict[str, tuple[int, int, zipfile.ZipInfo]] = {}
        for info in infos:
            if info.flag_bits & 0x1:
                raise _bad(path, f"zip entry {_short(info.filename)} is encrypted")
            start = _local_data_offset(f, info, size, path)
            if start + info.compress_size > size:
                raise _bad(
                    path,
                    f"zip entry {_short(info.filename)} claims {info.compress_size} bytes past the end of the file",
                )
            if info.compress_type == zipfile.ZIP_STORED:
                if info.file_size != info.compress_size:
                    raise _bad(path, f"stored zip entry {_short(info.filename)} has two sizes")
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                if info.file_size > min(MAX_INFLATED_RECORD, _DEFLATE_MAX_RATIO * info.compress_size + 64):
                    raise _bad(path, f"zip entry {_short(info.filename)} claims to inflate to {info.file_size} bytes")
            else:
                raise _bad(path, f"zip entry {_short(info.filename)} uses unsupported compression {info.compress_type}")
            spans.append((info.header_offset, start + info.compress_size, info.filename))
            entries[info.filename] = (start, info.file_size, info)
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise _bad(path, f"zip entries {_short(a)} and {_short(b)} overlap")

        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if any(n.endswith("constants.pkl") for n in names):
            raise InputError(
                f"{path}: a TorchScript archive (torch.jit.save) holds code, not a state dict",
                hint="load it with torch.jit.load where you trust it and save model.state_dict()",
            )
        if len(pkls) != 1:
            raise _bad(path, "no single <archive>/data.pkl entry" if not pkls else "several data.pkl entries")
        prefix = pkls[0][: -len("data.pkl")]
        stray = [n for n in names if not n.startswith(prefix)]
        if stray:
            raise _bad(path, f"zip entry {_short(stray[0])} lies outside the archive folder {_short(prefix)}")
        rel = {n[len(prefix) :]: v for n, v in entries.items()}
        big_endian = False
        if "byteorder" in rel:
            order = _read_small(zf, rel["byteorder"][2], path)
            if order not in (b"little", b"big"):
                raise _bad(path, f"unknown byte order {_short(order)}")
            big_endian = order == b"big"

    pickle_bytes = _torch_reader_agrees(path, rel)
    claims = _Claims(legacy=False)
    _, resolver = _scan(path, _Source(pickle_bytes), claims)
    records: dict[str, tuple[int, int]] = {}
    for key, claim in claims.by_key.items():
        entry = rel.get(f"data/{key}")
        if entry is None:
            raise _bad(path, f"storage {key!r} has no zip entry data/{key}")
        start, nbytes, info = entry
        if info.compress_type != zipfile.ZIP_STORED:
            raise _bad(path, f"storage {key!r} is compressed; torch.save stores tensor data uncompressed")
        if nbytes != claim.nbytes:
            raise _bad(
                path,
                f"storage {key!r} claims {claim.nbytes} bytes ({claim.nbytes // claim.itemsize} x {claim.dtype_name})"
                f" but its zip entry holds {nbytes}",
            )
        records[key] = (start, nbytes)
    return _Layout(path, size, True, pickle_bytes, (0, 0), records, claims.by_key, big_endian,
                   sorted(resolver.placeholders))  # fmt: skip


def _read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> bytes:
    if info.file_size > 64:
        raise _bad(path, f"zip entry {_short(info.filename)} is larger than expected")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise _bad(path, f"zip entry {_short(info.filename)} is unreadable ({_first_line(exc)})") from None


def _torch_reader_agrees(path: str, rel: dict) -> bytes:
    """Open the archive with torch's own reader, check it sees the same entries at the same
    offsets as the validation did, and return data.pkl as torch will unpickle it."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(path)
        records = set(reader.get_all_records())
        if records != set(rel):
            odd = sorted(records ^ set(rel))[0]
            raise _bad(path, f"zip readers disagree about entry {_short(odd)}")
        for name, (start, nbytes, info) in rel.items():
            if info.compress_type == zipfile.ZIP_STORED and (
                reader.get_record_offset(name) != start or reader.get_record_size(name) != nbytes
            ):
                raise _bad(path, f"zip readers disagree about where entry {_short(name)} lies")
        if reader.get_record_size("data.pkl") != rel["data.pkl"][1]:
            raise _bad(path, "zip readers disagree about the size of data.pkl")
        data = reader.get_record("data.pkl")
    except RuntimeError as exc:
        raise _bad(path, f"not a readable torch archive ({_first_line(exc)})") from None
    return bytes(data)


def _legacy_layout(path: str, size: int) -> _Layout:
    """The legacy (non-zip) layout: magic, protocol, sys_info, main pickle, storage keys, data."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        src = _Source(view)
        magic, _ = _scan(path, src, _Claims(legacy=True))
        if magic != _LEGACY_MAGIC:
            raise _bad(path, "wrong magic number for the legacy torch format")
        proto, _ = _scan(path, src, _Claims(legacy=True))
        if proto != _LEGACY_PROTOCOL:
            raise _bad(path, f"legacy protocol version {_short(proto)}")
        sys_info, _ = _scan(path, src, _Claims(legacy=True))
        big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        start = src.pos
        claims = _Claims(legacy=True)
        _, resolver = _scan(path, src, claims)
        span = (start, src.pos)
        keys, _ = _scan(path, src, _Claims(legacy=True))
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _bad(path, "the storage key list is not a list of strings")
        if len(set(keys)) != len(keys):
            raise _bad(path, "a storage key is listed twice")
        roots = {k: c for k, c in claims.by_key.items()}
        missing = [k for k in roots if k not in set(keys)]
        if missing:
            raise _bad(path, f"storage {missing[0]!r} has no data in the file")
        records: dict[str, tuple[int, int]] = {}
        offset = src.pos
        for key in keys:
            claim = roots.get(key)
            if claim is None:
                raise _bad(path, f"data for storage {_short(key)}, which the pickle never uses")
            if offset + 8 > size:
                raise _bad(path, f"storage {key!r} starts past the end of the file")
            (numel,) = struct.unpack_from("<q", view, offset)
            if numel < 0 or numel * claim.itemsize != claim.nbytes:
                raise _bad(path, f"storage {key!r}: the pickle claims {claim.nbytes} bytes, the data record {numel} x "
                                 f"{claim.itemsize}")  # fmt: skip
            if offset + 8 + claim.nbytes > size:
                raise _bad(path, f"storage {key!r} runs {offset + 8 + claim.nbytes - size} bytes past the end")
            records[key] = (offset + 8, claim.nbytes)
            offset += 8 + claim.nbytes
    return _Layout(path, size, False, None, span, records, claims.by_key, big_endian, sorted(resolver.placeholders))


def scan(path: str, zip_format: bool) -> _Layout:
    """Validate a torch file without allocating, importing or calling anything it names."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return _zip_layout(path, size) if zip_format else _legacy_layout(path, size)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError:  # mmap of a file emptied since it was sniffed
        raise InputError(f"{path}: the file changed while it was read") from None


# ----------------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


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
        raise InputError(f"{path}: cannot read torch checkpoint: {_first_line(exc)}") from None


def _restricted_load(layout: _Layout):
    """Load with the allow-list interpreter: unknown globals stay inert placeholders."""
    import torch

    path = layout.path
    if layout.big_endian and not layout.zip:
        raise _bad(path, "a big-endian legacy checkpoint needs torch's own loader, which refused it")
    if layout.pickle_bytes is not None:
        data = layout.pickle_bytes
    else:
        with open(path, "rb") as f:
            f.seek(layout.pickle_span[0])
            data = f.read(layout.pickle_span[1] - layout.pickle_span[0])
    overall = torch.UntypedStorage.from_file(path, False, layout.size) if layout.size else None
    storages: dict[str, _StorageRef] = {}

    def persistent(pid):
        claim = _claim(pid, legacy=not layout.zip)
        if claim is None:
            return Placeholder("a pickled module's source")
        if claim.key not in storages:
            known = layout.claims.get(claim.key)
            if known is None or (known.nbytes, known.dtype_name) != (claim.nbytes, claim.dtype_name):
                raise _Malformed(f"storage {claim.key!r} differs from the scanned one")
            start, nbytes = layout.records[claim.key]
            untyped = overall[start : start + nbytes] if nbytes else torch.UntypedStorage(0)
            dtype = getattr(torch, claim.dtype_name)
            if layout.big_endian and claim.itemsize > 1:
                untyped.byteswap(dtype)  # a private, copy-on-write mapping: the file is untouched
            storages[claim.key] = _StorageRef(untyped, dtype)
        ref = storages[claim.key]
        if claim.view is not None:
            vkey, off, numel = claim.view
            sub = ref.untyped[off * claim.itemsize : (off + numel) * claim.itemsize]
            return storages.setdefault(vkey, _StorageRef(sub, ref.dtype))
        return ref

    resolver = _Resolver(path, calls=True)
    interp = _Unpickler(_Source(data), resolver, persistent)
    try:
        obj = interp.load()
    except _Malformed as exc:
        raise _bad(path, str(exc)) from None
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


# ----------------------------------------------------------------------------- the state dict


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
        raise InputError(f"{path}: state dict keys must be strings, found {_short(bad)}")
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
                raise InputError(f"{path}: tensor name {_short(name)} is not valid Unicode")
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
    text = key if isinstance(key, str) else _short(key)
    return _printable(text.encode("utf-8", "backslashreplace").decode("utf-8"))


__all__ = [
    "STATE_DICT_KEYS",
    "PickleResult",
    "Placeholder",
    "describe",
    "extract_state_dict",
    "load_pickle",
    "refused_global",
    "scan",
    "torch_load",
]
