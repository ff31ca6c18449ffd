"""The pickle opcode interpreter: reads a pickle without importing or calling anything it names.

:class:`Unpickler` runs the opcodes of pickle protocols 2 to 5 (no text opcodes of
protocols 0/1, no extension codes, no out-of-band buffers) over a :class:`Source`. What a
global becomes is the caller's ``resolve(module, name)``; what a persistent id becomes is
the caller's ``persistent(pid)``. Invariants:

- nothing is imported, and nothing is called but a :class:`Safe` wrapper the resolver
  handed out; REDUCE / NEWOBJ on a :class:`Placeholder` give a placeholder, on anything
  else they are an error; BUILD, APPEND and SETITEM fill placeholders and plain
  containers only;
- a read never asks for more bytes than are left (:class:`Source`), so no length field
  makes anything allocate;
- a dict key or set member is hashable, nested at most ``MAX_KEY_DEPTH`` deep and holds
  at most ``MAX_KEY_ITEMS`` elements counted with repeats (hashing a key walks them all,
  and a tuple that holds one tuple twice, 40 times over, holds 2**40); at most
  ``MAX_HASH_COLLISIONS`` distinct keys share one hash (distinct keys crafted to collide
  make every dict insertion walk all of them); an integer is at most ``MAX_LONG_BYTES``
  long;
- the work and memory of one run are bounded by its ``budget`` (:func:`budget_for` the
  file's size): every opcode, every argument a call may copy, every element of a key
  hashed and every entry of a BUILD state counts one unit, and the run is refused past
  the budget, before the memo, the stack or the objects built outgrow what a file of
  that size describes;
- every failure is a :class:`Malformed` (or the resolver's WsurgeryError, or
  MemoryError); messages show attacker-chosen values through :func:`short` /
  :func:`printable`, bounded and printable.

The inert values the resolvers hand out (:class:`Placeholder`, :class:`StorageType`,
:class:`TypeRef`, :class:`Safe`) live here, since the interpreter's rules are about them.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass

from ...errors import WsurgeryError

MAX_KEY_DEPTH = 64  # nesting allowed in a dict key / set member
MAX_KEY_ITEMS = 4096  # elements, counted with repeats, of a dict key / set member
MAX_HASH_COLLISIONS = 32  # distinct dict keys / set members that may share one hash
MAX_LONG_BYTES = 4096  # an integer of the pickle (LONG4); no checkpoint needs a longer one
MIN_BUDGET = 1 << 20  # units of work any pickle may spend, whatever the file's size
_MAX_GLOBAL_LINE = 4096
_HASH_MODULUS = (1 << 61) - 1  # hash(n) == n for 0 <= n < this: such ints never collide


def budget_for(file_size: int) -> int:
    """The work and memory budget of one pickle of a file of ``file_size`` bytes.

    One unit is an opcode run, an element a call may copy, an element of a key hashed or
    an entry of a BUILD state; each costs at most a few hundred bytes and a microsecond.
    A pickle stored in the file spends at most about one unit per byte of it, so an
    honest file never reaches ``file_size``; a deflated pickle (or a call that copies a
    large argument over and over) that would, is a memory or time bomb.
    """
    return max(MIN_BUDGET, file_size)


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
class StorageType:
    """A storage class named by a pickle (``torch.FloatStorage``): its element type."""

    qualname: str
    dtype_name: str  # torch dtype name without prefix
    itemsize: int


@dataclass(frozen=True)
class TypeRef:
    """A type that may be named but never called (``torch.Tensor``: its constructor allocates)."""

    qualname: str


class Safe:
    """An allow-listed callable: a wrapper that validates its arguments, then builds the value."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        self.qualname = qualname
        self.fn = fn

    def __repr__(self) -> str:
        return f"<allowed {self.qualname}>"


class Malformed(Exception):
    """Internal: the pickle breaks a rule; turned into an InputError naming the file."""


def printable(text: str, limit: int = 200) -> str:
    """Attacker-chosen text made fit for one line of a terminal: escapes, bounded length."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


def short(x, limit: int = 60) -> str:
    """A bounded, always-formattable description of an attacker-chosen value."""
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, int):
        return repr(x) if x.bit_length() <= 64 else f"<{x.bit_length()}-bit integer>"
    if isinstance(x, (str, bytes)):
        return repr(x[:limit]) + ("..." if len(x) > limit else "")
    if isinstance(x, (Placeholder, Safe, StorageType, TypeRef)):
        return repr(x)
    return type(x).__name__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# ----------------------------------------------------------------------------- byte sources


class Source:
    """Bounded reads over a buffer (bytes, or a read-only memory map of the file): a read
    never asks for more than is left, so a length field cannot make anything allocate."""

    def __init__(self, data, start: int = 0):
        self.data = data
        self.pos = start
        self.end = len(data)

    def truncated(self, n) -> Malformed:
        return Malformed(f"truncated pickle: needs {short(n)} bytes at byte {self.pos}, {self.end - self.pos} left")

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
            raise Malformed(f"unterminated name line at byte {self.pos}")
        return self.read(i + 1 - self.pos)


_I4, _U4, _U8, _U2, _F8 = (struct.Struct(f) for f in ("<i", "<I", "<Q", "<H", ">d"))


# ----------------------------------------------------------------------------- the interpreter


def canonical(module: str, name: str) -> tuple[str, str]:
    """Python 2 spellings (``__builtin__``, ``copy_reg``) as Python 3 names them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


_OPS: dict[int, str] = {}


def _op(code: bytes):
    def deco(fn):
        _OPS[code[0]] = fn.__name__
        return fn

    return deco


class Unpickler:
    """A pickle opcode interpreter that never imports a module nor calls a function
    it was not given.

    ``resolve(module, name)`` turns a global into a value (a placeholder, an inert marker,
    or a :class:`Safe` wrapper); ``persistent(pid)`` turns a persistent id into a
    storage. REDUCE / NEWOBJ call only :class:`Safe` wrappers; on a placeholder they give
    a placeholder; on anything else they are an error. BUILD, APPEND and SETITEM fill
    placeholders and plain containers only. Protocols 2 to 5 are read, without the
    text opcodes of protocols 0/1, extension codes and out-of-band buffers.
    """

    def __init__(self, src: Source, resolve, persistent, *, budget: int | None = None, on_build=None):
        self.src = src
        self.resolve = resolve
        self.persistent = persistent
        self.budget = budget_for(src.end) if budget is None else budget
        self.spent = 0
        self.on_build = on_build  # on_build(inst, state), called before every BUILD
        self.memo: dict = {}
        self.stack: list = []
        self.metastack: list = []
        self.notes: list[str] = []
        self._nest: dict[int, tuple[int, int]] = {}  # id(tuple/frozenset) -> (depth, items)
        self._alive: list = []  # keeps the objects of _nest alive, so ids stay unique
        self._hashes: dict[int, list] = {}  # hash -> the distinct keys that have it (see _note_hash)

    # -- helpers --------------------------------------------------------------------
    def load(self):
        """Interpret up to STOP. Any failure is a :class:`Malformed` (or the resolver's
        :class:`UnsafePickleError`): a hostile pickle may make a rebuild raise anything."""
        try:
            return self._run()
        except (Malformed, WsurgeryError, MemoryError):
            raise
        except RecursionError:
            raise Malformed("the pickle nests too deeply") from None
        except Exception as exc:  # noqa: BLE001
            raise Malformed(f"{type(exc).__name__}: {first_line(exc)}") from None

    def charge(self, units: int) -> None:
        """Spend ``units`` of the budget; past it the pickle is refused."""
        self.spent += units
        if self.spent > self.budget:
            raise Malformed(
                f"the pickle builds more than {self.budget} objects, more than a file of its size describes "
                "(a memory or time bomb)"
            )

    def _run(self):
        src = self.src
        table = [None] * 256
        for code, name in _OPS.items():
            table[code] = getattr(self, name)
        budget = self.budget
        while True:
            self.spent += 1
            if self.spent > budget:
                self.charge(0)
            code = src.byte()
            handler = table[code]
            if handler is None:
                raise Malformed(f"unsupported pickle opcode 0x{code:02x} at byte {src.pos - 1}")
            if handler() is _STOP:
                if len(self.stack) != 1 or self.metastack:
                    raise Malformed("the pickle's stack is not balanced at STOP")
                return self.stack.pop()

    def pop_mark(self) -> list:
        items = self.stack
        if not self.metastack:
            raise Malformed("a container opcode without its MARK")
        self.stack = self.metastack.pop()
        return items

    def pop(self):
        if not self.stack:
            raise Malformed("stack underflow")
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise Malformed("stack underflow")
        return self.stack[-1]

    def nesting(self, x) -> tuple[int, int]:
        """``(depth, elements counted with repeats)`` of a value: a tuple or frozenset
        nests, anything else is one element at depth 0."""
        if type(x) in _NESTING:
            return self._nest.get(id(x)) or (1, 1 + len(x))
        return (0, 1)

    def nested(self, obj, items) -> object:
        """Record how deep and how large a new tuple or frozenset is (only when it holds
        another: a flat one is measured by its length). Sizes saturate past the limit."""
        inner = [self._nest.get(id(i)) or (1, 1 + len(i)) for i in items if type(i) in _NESTING]
        if inner:
            depth = 1 + max(d for d, _ in inner)
            size = min(MAX_KEY_ITEMS + 1, 1 + len(items) - len(inner) + sum(n for _, n in inner))
            self._nest[id(obj)] = (depth, size)
            self._alive.append(obj)
        return obj

    def check_key(self, key) -> None:
        """Refuse a dict key or set member that cannot be hashed, or whose hashing would
        cost more than its bytes in the pickle (see the module's invariants)."""
        if isinstance(key, (list, dict, set, bytearray)):
            raise Malformed(f"a dict key or set member is an unhashable {type(key).__name__}")
        depth, size = self.nesting(key)
        if depth > MAX_KEY_DEPTH:
            raise Malformed(f"a dict key or set member is nested more than {MAX_KEY_DEPTH} deep")
        if size > MAX_KEY_ITEMS:
            raise Malformed(f"a dict key or set member holds more than {MAX_KEY_ITEMS} elements (counted with repeats)")
        self.charge(size)
        self._note_hash(key)

    def _note_hash(self, key) -> None:
        """Refuse distinct keys crafted to share one hash (``k * (2**61 - 1)`` for every k):
        each dict insertion would compare the new key with all of them. str and bytes
        hashes are salted per process, and a non-negative int below 2**61 - 1 is its own
        hash, so only the other keys are counted."""
        kind = type(key)
        if kind is str or kind is bytes or kind is bool or key is None or isinstance(key, Placeholder):
            return
        if kind is int and 0 <= key < _HASH_MODULUS:
            return
        group = self._hashes.setdefault(hash(key), [])
        if key not in group:
            group.append(key)
            if len(group) > MAX_HASH_COLLISIONS:
                raise Malformed(
                    f"more than {MAX_HASH_COLLISIONS} distinct dict keys or set members share one hash "
                    "(keys crafted to collide, which makes loading take quadratic time)"
                )

    @staticmethod
    def _copied(x) -> int:
        """Units of work a call may spend copying ``x``: its length, for a container or text."""
        if isinstance(x, (str, bytes, bytearray)):
            return 1 + len(x) // 64
        if isinstance(x, (list, tuple, dict, set, frozenset)):
            return 1 + len(x)
        return 1

    def call(self, func, args, kwargs=None):
        if not isinstance(args, tuple):
            raise Malformed(f"call arguments are a {type(args).__name__}, not a tuple")
        # A constructor may copy its arguments (set(x), bytearray(x), OrderedDict(x)), here
        # or in torch.load: each call pays for what it may copy.
        self.charge(sum(self._copied(a) for a in args) + (self._copied(kwargs) if kwargs else 0))
        if isinstance(func, Placeholder):
            return Placeholder(func.of, called=True, args=args)
        if isinstance(func, Safe):
            if kwargs:
                raise Malformed(f"keyword arguments to {func.qualname}")
            return func.fn(self, *args)
        raise Malformed(f"the pickle calls {short(func)}, which is not an allowed function")

    def text(self, raw: bytes, *, strict: bool = False):
        try:
            return raw.decode("utf-8", "strict" if strict else "surrogatepass")
        except UnicodeDecodeError:
            if strict:
                raise Malformed("a name is not UTF-8") from None
            return raw

    def global_(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise Malformed("a global's module and name must be strings")
        module, name = canonical(module, name)
        self.stack.append(self.resolve(module, name))

    # -- protocol and framing -------------------------------------------------------
    @_op(pickle.PROTO)
    def op_proto(self):
        proto = self.src.byte()
        if not 2 <= proto <= 5:
            raise Malformed(f"pickle protocol {proto} (only 2 to 5 are read)")

    @_op(pickle.FRAME)
    def op_frame(self):
        n = self.src.unpack(_U8)
        if n > self.src.end - self.src.pos:
            raise Malformed("a frame runs past the end of the pickle")

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
            raise Malformed("LONG4 with a negative length")
        if n > MAX_LONG_BYTES:
            raise Malformed(f"an integer of {n} bytes (at most {MAX_LONG_BYTES} are read)")
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
            raise Malformed("BINSTRING with a negative length")
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
        items = self.pop_mark()  # first: pop_mark replaces self.stack, so append to the one it restores
        self.stack.append(items)

    @_op(pickle.DICT)
    def op_dict(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise Malformed("DICT with an odd number of items")
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
            raise Malformed(f"APPEND to a {short(target)}")

    @_op(pickle.SETITEM)
    def op_setitem(self):
        value, key = self.pop(), self.pop()
        self._setitems(self.top(), [key, value])

    @_op(pickle.SETITEMS)
    def op_setitems(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise Malformed("SETITEMS with an odd number of items")
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
            raise Malformed(f"SETITEM on a {short(target)}")

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
            raise Malformed(f"ADDITEMS on a {short(target)}")

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
            raise Malformed(f"memo entry {i} read before it was written")
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
            raise Malformed("NEWOBJ_EX keyword arguments are not a dict")
        self.stack.append(self.call(cls, args, kwargs))

    @_op(pickle.BUILD)
    def op_build(self):
        state = self.pop()
        inst = self.top()
        self.charge(self._copied(state))  # torch.load copies a dict state into the instance
        if self.on_build is not None:
            self.on_build(inst, state)
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
