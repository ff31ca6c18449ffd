"""Property tests over hostile inputs: byte-level and structural mutations of valid
safetensors files, torch pickles (zip and legacy), alias metadata and sharded indexes.

The contract, for every input: loading (and, when it loads, reading every tensor and
writing the checkpoint back) either succeeds or raises a :class:`WsurgeryError` whose
message is one line. Never another exception, never a hang (a 60 s watchdog per input
turns one into a failure), never code run (payloads that would create a marker file
must leave none).

``make test`` runs a bounded, derandomized number of examples; ``make fuzz`` runs the
same targets for minutes (``fuzz/campaign.py``) and reports how many inputs it tried.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import struct
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

import wsurgery
from wsurgery.errors import WsurgeryError
from wsurgery.model import tensor_bytes

# --- profiles: `make test` is bounded and repeatable; the campaign loads its own ------------------

settings.register_profile(
    "wsurgery-ci",
    max_examples=int(os.environ.get("WSURGERY_FUZZ_EXAMPLES", "100")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile(
    "wsurgery-campaign",
    max_examples=200,
    deadline=None,
    derandomize=False,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
PROFILE = "wsurgery-ci"

# --- the contract ------------------------------------------------------------------------------------

TRIED = {"inputs": 0, "loaded": 0, "refused": 0}
WATCHDOG_S = 60
_WORK = None


class Hang(Exception):
    """An input took longer than the watchdog allows (a hang is a bug, like a crash)."""


def workdir() -> Path:
    global _WORK
    if _WORK is None:
        _WORK = tempfile.TemporaryDirectory(prefix="wsurgery-fuzz-")
    return Path(_WORK.name)


@contextlib.contextmanager
def watchdog(seconds: int = WATCHDOG_S):
    """Turn an input that takes longer than ``seconds`` into a :class:`Hang`, even when the code
    it interrupted wrapped the alarm into an error of its own (wsurgery turns any exception of
    torch.load or of a rebuild into an InputError: a hang there must not count as a refusal)."""
    fired = []

    def fire(signum, frame):
        fired.append(1)
        raise Hang(f"no result after {seconds} s")

    if not hasattr(signal, "SIGALRM") or not _main_thread():
        yield
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    except Exception:
        if fired:
            raise Hang(f"no result after {seconds} s") from None
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def exercise(path: Path) -> str:
    """Load, read every tensor, write back, load the copy: 'loaded' or 'refused'."""
    TRIED["inputs"] += 1
    out = path.with_name(path.name + ".out.safetensors")
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    try:
        with watchdog():
            ckpt = wsurgery.load(path)
            try:
                sd = ckpt.state_dict()
                assert set(sd) == set(ckpt.names())
                ckpt.save(out)
            finally:
                ckpt.close()
            back = wsurgery.load(out)
            try:
                assert set(back.names()) == set(sd)
                for name, b in back.state_dict().items():
                    a = sd[name]
                    assert a.shape == b.shape and a.dtype == b.dtype, name
                    assert bytes(tensor_bytes(a)) == bytes(tensor_bytes(b)), name
            finally:
                back.close()
    except WsurgeryError as exc:
        assert "\n" not in str(exc) and "\n" not in (exc.hint or ""), repr(exc)
        TRIED["refused"] += 1
        return "refused"
    TRIED["loaded"] += 1
    return "loaded"


def put(data: bytes, name: str) -> Path:
    path = workdir() / name
    path.write_bytes(data)
    return path


# --- seeds -------------------------------------------------------------------------------------------


def _safetensors_seed() -> bytes:
    rng = np.random.default_rng(0)
    aliases = {"wt": {"source": "w", "transform": ["transpose"]}, "w2": {"source": "w", "transform": []}}
    return st_save(
        {
            "w": rng.standard_normal((2, 3)).astype(np.float32),
            "b": np.arange(3, dtype=np.float16),
            "s": np.array(7, dtype=np.int64),
            "z": np.zeros((0, 2), dtype=np.uint8),
            "layer.0.flag": np.array([True, False]),
        },
        metadata={"format": "pt", "wsurgery.aliases": json.dumps(aliases), "w2": "w", "note": "seed"},
    )


class _Cfg:  # pickled as an instance of a class that is not installed
    def __init__(self):
        self.lr, self.tags = 0.5, ("a", "b")


def _torch_seeds() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, generator=g)
    sd = {"w": w, "wt": w.t(), "b": torch.arange(3, dtype=torch.int32), "p": torch.nn.Parameter(torch.ones(2))}
    mod = types.ModuleType("fuzz_missing_pkg")
    _Cfg.__module__, _Cfg.__qualname__ = "fuzz_missing_pkg", "Cfg"
    mod.Cfg = _Cfg
    sys.modules["fuzz_missing_pkg"] = mod
    try:
        seeds = {}
        for key, (obj, kw) in {
            "zip": (sd, {}),
            "legacy": (sd, {"_use_new_zipfile_serialization": False}),
            "lightning": ({"state_dict": sd, "hyper_parameters": {"cfg": _Cfg()}, "epoch": 1}, {}),
            "lightning-legacy": ({"state_dict": sd, "cfg": _Cfg()}, {"_use_new_zipfile_serialization": False}),
            "protocol4": (sd, {"pickle_protocol": 4}),
        }.items():
            buf = io.BytesIO()
            torch.save(obj, buf, **kw)
            seeds[key] = buf.getvalue()
        return seeds
    finally:
        del sys.modules["fuzz_missing_pkg"]


SAFETENSORS_SEED = _safetensors_seed()
TORCH_SEEDS = _torch_seeds()

# --- byte-level mutation -------------------------------------------------------------------------------

INTERESTING_U64 = [0, 1, 7, 8, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 100_000_000, 100_000_001]


@st.composite
def mutated(draw, seed: bytes, max_ops: int = 6) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, max_ops))):
        n = len(data)
        op = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate", "u64", "u32", "splice", "dup"]))
        at = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord('"'), ord("."), ord("\\")]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            del data[at : at + draw(st.integers(1, 32))]
        elif op == "truncate":
            del data[at:]
        elif op == "u64" and n >= 8:
            at = min(at, n - 8)
            data[at : at + 8] = struct.pack("<Q", draw(st.sampled_from(INTERESTING_U64)))
        elif op == "u32" and n >= 4:
            at = min(at, n - 4)
            data[at : at + 4] = struct.pack("<I", draw(st.sampled_from(INTERESTING_U64)) & 0xFFFFFFFF)
        elif op == "splice" and n:
            other = draw(st.integers(0, n - 1))
            size = draw(st.integers(1, 64))
            data[at : at + size] = data[other : other + size]
        elif op == "dup" and n:
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


def _header_mutation_targets() -> st.SearchStrategy[bytes]:
    """Mutations aimed at the JSON header: decode it, replace a value, re-encode."""
    (n,) = struct.unpack("<Q", SAFETENSORS_SEED[:8])
    header = json.loads(SAFETENSORS_SEED[8 : 8 + n])
    data = SAFETENSORS_SEED[8 + n :]
    json_leaf = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
    )
    json_value = st.recursive(
        json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8
    )

    @st.composite
    def build(draw):
        h = json.loads(json.dumps(header))
        name = draw(st.sampled_from(sorted(h)))
        if name == "__metadata__":
            key = draw(st.sampled_from(sorted(h[name]) + ["wsurgery.aliases", "format", "x"]))
            h[name][key] = draw(json_value | st.text(max_size=12))
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
            if field is None:
                h[name] = draw(json_value)
            else:
                h[name][field] = draw(
                    json_value | st.lists(st.integers(-3, 2**66), max_size=4) | st.sampled_from(["F32", "BF16", "X"])
                )
        text = json.dumps(h).encode()
        tail = draw(st.sampled_from([data, data[:-1], data + b"\0", b""]))
        return struct.pack("<Q", len(text)) + text + tail

    return build()


# --- structural safetensors: plausible files, often valid, with random aliases ------------------------

DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
STEP_NAMES = ["same", "SAME", "transpose", "TRANSPOSE", "permute", "reshape", "slice", "cast", "scale", "flip", ""]
NAMES = st.sampled_from(["w", "b", "layer.0.w", "layer.0", "a b", "ü.名", "x" * 300, "", ".", "w.", "__metadata__"])


@st.composite
def transform_spec(draw) -> str:
    name = draw(st.sampled_from(STEP_NAMES))
    if draw(st.booleans()):
        return name
    args = draw(
        st.lists(
            st.integers(-5, 5).map(str)
            | st.sampled_from(["-1", "", "bfloat16", "float32", "int8", "0.5", "nan", "inf", "1e400", "9" * 30]),
            max_size=4,
        )
    )
    return f"{name}({','.join(args)})"


@st.composite
def plausible_safetensors(draw) -> tuple[bytes, bool]:
    """A laid-out file and whether it is valid by construction (no alias records: must load)."""
    names = draw(st.lists(NAMES | st.text(min_size=1, max_size=12), min_size=0, max_size=5, unique=True))
    header: dict = {}
    cursor = 0
    for name in names:
        if name == "__metadata__":
            continue
        code = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = DTYPES[code] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [cursor, cursor + size]}
        cursor += size
    stored = [n for n in header]
    aliases = {}
    for _ in range(draw(st.integers(0, 3))):
        alias = draw(NAMES | st.text(max_size=6))
        source = draw(st.sampled_from(stored + ["missing"]) if stored else st.just("missing"))
        aliases[alias] = {"source": source, "transform": draw(st.lists(transform_spec(), max_size=3))}
    meta = {"format": "pt"}
    if aliases:
        meta["wsurgery.aliases"] = json.dumps(aliases)
    if stored and draw(st.booleans()):
        meta[draw(st.text(max_size=6))] = draw(st.sampled_from(stored))  # save_model convention
    order = draw(st.permutations(list(header.items()))) if header else []
    obj = {"__metadata__": meta, **dict(order)}
    text = json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()
    pad = draw(st.integers(0, 7))
    data = draw(st.binary(min_size=cursor, max_size=cursor)) if cursor <= 4096 else bytes(cursor)
    return struct.pack("<Q", len(text) + pad) + text + b" " * pad + data, not aliases


# --- structural pickles: random opcode programs around real tensor snippets ---------------------------

MARKER = "wsurgery-fuzz-MARKER"
GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("torch", "Size"),
    ("torch", "float32"),
    ("torch", "Tensor"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("builtins", "set"),
    ("fuzz_missing_pkg", "Cfg"),
    ("argparse", "Namespace"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("__builtin__", "getattr"),
]


def _u(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _tensor_snippet(key: str, numel: int, size: tuple, legacy: bool = False) -> bytes:
    """``_rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), 0, size, (..), False, OrderedDict())``."""
    stride = []
    acc = 1
    for d in reversed(size):
        stride.insert(0, acc)
        acc *= max(d, 1)

    def tup(xs):
        return b"(" + b"".join(b"J" + struct.pack("<i", x) for x in xs) + b"t"

    pid = b"(" + _u("storage") + b"ctorch\nFloatStorage\n" + _u(key) + _u("cpu") + b"J" + struct.pack("<i", numel)
    pid += (b"N" if legacy else b"") + b"tQ"
    hooks = b"\x89ccollections\nOrderedDict\n)R"
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"K\x00" + tup(size) + tup(stride) + hooks + b"tR"


@st.composite
def plausible_value(draw, legacy: bool) -> bytes:
    """Opcodes for one value: mostly well-formed, so the program reaches torch.load and the fallback."""
    kind = draw(st.integers(0, 7))
    if kind <= 2:
        size = draw(st.sampled_from([(4,), (2, 2), (1, 4), (2,), (0,), (4, 1)]))
        return _tensor_snippet("0", draw(st.sampled_from([4, 4, 4, 3, 5])), size, legacy)
    if kind == 3:
        return b"cfuzz_missing_pkg\nCfg\n)\x81}" + _u("lr") + b"K\x05sb"  # an instance of a missing class
    if kind == 4:
        return b"cargparse\nNamespace\n" + _u("x") + b"\x85R"
    if kind == 5:
        return b"}" + _u("inner") + _tensor_snippet("1", 4, (4,), legacy) + b"s"
    if kind == 6:
        return draw(st.sampled_from([b"K\x07", _u("text"), b"N", b"]K\x01a", b"ctorch\nfloat32\n"]))
    return b"cposix\nsystem\n" + _u("touch " + MARKER) + b"\x85R"  # must be refused, never run


@st.composite
def plausible_program(draw, legacy: bool = False) -> bytes:
    body = b"\x80\x02}"
    for _ in range(draw(st.integers(1, 6))):
        key = draw(st.sampled_from(["w", "b", "state_dict", "hyper_parameters", "layer.0.weight", "ü", "x" * 40]))
        body += _u(key) + draw(plausible_value(legacy)) + b"s"
    program = body + b"."
    if draw(st.booleans()):
        program = draw(mutated(program, max_ops=3))
    return program


@st.composite
def pickle_program(draw, legacy: bool = False) -> bytes:
    if draw(st.booleans()):
        return draw(plausible_program(legacy))
    pieces = [b"\x80\x02}"]
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            key = draw(st.sampled_from(["w", "b", "state_dict", "x" * 40, "é"]))
            numel = draw(st.sampled_from([4, 0, 3, 5, 2**31 - 1]))
            size = draw(st.sampled_from([(4,), (2, 2), (0,), (5,), (1, 4), (2**20,)]))
            pieces.append(_u(key) + _tensor_snippet(draw(st.sampled_from(["0", "1"])), numel, size, legacy) + b"s")
        elif kind == 1:
            module, name = draw(st.sampled_from(GLOBALS))
            pieces.append(f"c{module}\n{name}\n".encode())
        elif kind == 2:
            pieces.append(draw(st.sampled_from([b"N", b"K\x01", b"J\xff\xff\xff\xff", b"\x88", b"\x89", b")", b"]"])))
        elif kind == 3:
            pieces.append(_u(draw(st.sampled_from(["k", "touch " + MARKER, "storage", "cpu", ""]))))
        elif kind == 4:
            pieces.append(draw(st.sampled_from([b"(", b"t", b"\x85", b"\x86", b"\x87", b"l", b"d", b"e", b"a"])))
        elif kind == 5:
            pieces.append(draw(st.sampled_from([b"R", b"\x81", b"b", b"Q", b"s", b"u", b"0", b"2", b"1"])))
        elif kind == 6:
            pieces.append(b"q" + bytes([draw(st.integers(0, 3))]))
        elif kind == 7:
            pieces.append(b"h" + bytes([draw(st.integers(0, 3))]))
        elif kind == 8:
            pieces.append(draw(st.sampled_from([b"\x95" + struct.pack("<Q", 2**40), b"\x8c\x05abc", b"\x94", b"\x93"])))
        else:
            pieces.append(draw(st.binary(max_size=3)))
    pieces.append(b".")
    return b"".join(pieces)


def as_zip(pkl: bytes, records: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def as_legacy(pkl: bytes, storages: list[tuple[str, int]]) -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps(sys_info, 2)
    tail = pickle.dumps([k for k, _ in storages], 2)
    for _, numel in storages:
        tail += struct.pack("<q", numel) + bytes(4 * numel)
    return head + pkl + tail


# --- the properties -------------------------------------------------------------------------------------


def _no_marker():
    assert not Path(MARKER).exists() and not (workdir() / MARKER).exists(), "a pickle ran code"


def mutated_safetensors(data):
    exercise(put(data, "m.safetensors"))


def mutated_safetensors_header(data):
    exercise(put(data, "h.safetensors"))


def structural_safetensors(case):
    data, valid = case
    outcome = exercise(put(data, "p.safetensors"))
    assert outcome == "loaded" or not valid, "a valid file was refused"


def state_dict_round_trip(case):
    """Whatever the names and shapes, a state dict saved by wsurgery loads back equal."""
    names, shapes, tie = case
    sd = {n: torch.arange(int(np.prod(s)), dtype=torch.float32).reshape(s) for n, s in zip(names, shapes, strict=False)}
    if tie and len(names) >= 2 and sd[names[0]].shape == sd[names[1]].shape:
        sd[names[1]] = sd[names[0]]
    path = workdir() / "rt.safetensors"
    TRIED["inputs"] += 1
    wsurgery.save_state_dict(sd, path)
    back = wsurgery.load_state_dict(path)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    TRIED["loaded"] += 1


def mutated_torch_files(case):
    kind, data = case
    exercise(put(data, f"m-{kind}.pt"))
    _no_marker()


def structural_pickles(case):
    (legacy, pkl), record_size = case
    cwd = os.getcwd()
    os.chdir(workdir())  # a payload that ran would `touch` the marker here
    try:
        if legacy:
            data = as_legacy(pkl, [("0", record_size // 4)])
        else:
            data = as_zip(pkl, {"0": bytes(record_size), "1": bytes(16)})
        exercise(put(data, "s.pt"))
    finally:
        os.chdir(cwd)
    _no_marker()


def sharded_index(case):
    weight_map, metadata = case
    folder = workdir() / "sharded"
    folder.mkdir(exist_ok=True)
    if not (folder / "s1.safetensors").exists():
        (folder / "s1.safetensors").write_bytes(st_save({"w": np.ones(2, np.float32), "b": np.zeros(1, np.int8)}))
        (folder / "s2.safetensors").write_bytes(st_save({"layer.0": np.ones(3, np.float16)}))
    index = {"weight_map": weight_map} if metadata is None else {"metadata": metadata, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    exercise(folder)


SHARD_PATHS = ["s1.safetensors", "s2.safetensors", "./s1.safetensors", "../s1.safetensors", "/etc/passwd",
               "s3.safetensors", "", "sub/../s2.safetensors", "s1.safetensors\x00"]  # fmt: skip
INDEX_METADATA = [{}, {"total_size": 3}, {"wsurgery.aliases": "{}"}, {"wsurgery.aliases": 1}, [], None]


# --- hostile generators: the classes of the second attack ------------------------------------------------
# Shared containers, memo and stack growth, copying calls, long names, colliding and self-sharing
# keys, views larger than their storage, allocating constructors (pickles); huge and many dims,
# reserved metadata keys, long alias chains (safetensors). Sizes reach those of the bombs, so
# a regression is a hang (the watchdog), a MemoryError (the campaign's address-space limit, or
# the bounded child of test_hostile_generators_in_a_bounded_process) or a wrong result.


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)  # LONG_BINPUT


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)  # LONG_BINGET


_T = _tensor_snippet("0", 4, (4,))  # a tensor over storage "0" (16 bytes in the file)
_T_LEGACY = _tensor_snippet("0", 4, (4,), legacy=True)


@st.composite
def hostile_program(draw) -> tuple[str, bytes, bool, int]:
    """(kind, pickle, deflate, bytes of storage "1"): one program of a hostile class, at a drawn size."""
    kind = draw(
        st.sampled_from(["shared", "memo", "stack", "names", "copies", "collide", "tuple_key", "lists", "view"])
    )
    deflate = True
    if kind == "shared":  # d = {"a": d, "b": d}, levels deep, with a tensor at the bottom
        levels = draw(st.integers(0, 48))
        body = b"}" + _u("w") + _T + b"s" + _put(0)
        for i in range(levels):  # pop the last level, build the next over it twice
            body += b"0}(" + _u(draw(st.sampled_from(["a", "a.b", "x"]))) + _get(i) + _u("b") + _get(i) + b"u"
            body += _put(i + 1)
        pkl = b"\x80\x02" + body + b"."
    elif kind == "memo":  # the memo grows without the stack: MEMOIZE, or LONG_BINPUT to fresh indexes
        n = draw(st.sampled_from([10, 10_000, 1_100_000, 30_000_000]))
        op = draw(st.sampled_from(["memoize", "binput", "long_binput"]))
        if op == "memoize":
            pkl = b"\x80\x04}" + b"\x94" * n + b"."
        elif op == "binput":
            pkl = b"\x80\x02}" + b"q\x07" * n + b"."
        else:
            pkl = b"\x80\x02}" + b"".join(_put(i) for i in range(min(n, 3_000_000))) + b"."
    elif kind == "stack":  # the stack or the mark stack grows, then unwinds
        n = draw(st.sampled_from([10, 1_100_000, 20_000_000]))
        op = draw(st.sampled_from(["dicts", "marks", "dups"]))
        if op == "dicts":
            pkl = b"\x80\x04" + b"}" * n + b"0" * (n - 1) + b"."
        elif op == "marks":
            pkl = b"\x80\x04}" + b"(" * n + b"1" * n + b"."
        else:
            pkl = b"\x80\x04}(N" + b"2" * n + b"t0."
    elif kind == "names":  # a long key reused at every level of a deep chain, a tensor at each level
        key = "k" * draw(st.sampled_from([1, 64, 100_000]))
        depth = draw(st.sampled_from([1, 100, 3_000, 30_000]))
        body = _T + _put(0) + b"0" + _u(key) + _put(1) + b"0" + b"}(" + (_get(1) + b"}(") * depth
        body += (_u("w") + _get(0) + b"u") * (depth + 1)
        pkl = b"\x80\x02" + body + b"."
    elif kind == "copies":  # a constructor copying one large argument over and over
        size = draw(st.sampled_from([10, 10_000, 100_000]))
        calls = draw(st.sampled_from([10, 1_000, 100_000]))
        ctor, arg = draw(st.sampled_from([
            (b"cbuiltins\nset\n", b"(" + b"K\x01" * size + b"l"),
            (b"cbuiltins\nbytearray\n", b"B" + struct.pack("<I", size) + b"x" * size),
            (b"ccollections\nOrderedDict\n", b"(" + b"K\x01K\x02\x86" * size + b"l"),
            (b"ctorch\nSize\n", b"(" + b"K\x01" * size + b"t"),
        ]))  # fmt: skip
        body = b"}" + _u("c") + b"]" + arg + _put(0) + b"0" + ctor + _put(1) + b"0"
        body += (_get(1) + _get(0) + b"\x85Ra") * calls + b"s" + _u("w") + _T + b"s"
        pkl = b"\x80\x02" + body + b"."
    elif kind == "collide":  # distinct int keys of one hash
        n = draw(st.sampled_from([5, 40, 3_000, 60_000]))
        items = b"".join(
            b"\x8a\x0a" + (k * ((1 << 61) - 1)).to_bytes(10, "little", signed=True) + b"N" for k in range(1, n)
        )
        pkl = b"\x80\x02}(" + items + b"u" + _u("w") + _T + b"s."
    elif kind == "tuple_key":  # t = (t, t), levels deep, as a dict key or a set member
        levels = draw(st.integers(1, 63))
        key = b")" + b"2\x86" * levels
        pkl = b"\x80\x02}" + draw(st.sampled_from([key + b"Ns", b"cbuiltins\nset\n((" + key + b"ltR0"]))
        pkl += _u("w") + _T + b"s."
    elif kind == "lists":  # one long list of Nones under many keys (each described as skipped)
        items = draw(st.sampled_from([10, 100_000, 1_000_000]))
        keys = draw(st.sampled_from([1, 1_000, 30_000]))
        body = b"}" + _u("w") + _T + b"s" + b"](" + b"N" * items + b"e" + _put(0) + b"0("
        body += b"".join(_u(f"k{i}") + _get(0) for i in range(keys)) + b"u"
        pkl = b"\x80\x02" + body + b"."
    else:  # a view, a BUILD set_, or a constructor that allocates more than the storage or the file
        pkl, numel = draw(view_program())
        return ("view", pkl, False, 4 * numel)
    return (kind, pkl, deflate, 16)


BIG = [0, 1, 3, 4, 2**20, 2**27, 2**31, 2**40, 2**62]


@st.composite
def view_program(draw) -> tuple[bytes, int]:
    numel = draw(st.sampled_from([0, 1, 4]))
    size = tuple(draw(st.lists(st.sampled_from(BIG), min_size=1, max_size=3)))
    stride = tuple(draw(st.lists(st.sampled_from([0, 1, 4, 2**20, 2**40]), min_size=len(size), max_size=len(size))))
    offset = draw(st.sampled_from([0, 1, 3, 2**30]))

    def tup(xs):
        return b"(" + b"".join(b"\x8a\x08" + struct.pack("<q", x) for x in xs) + b"t"

    pid = (
        b"("
        + _u("storage")
        + b"ctorch\nFloatStorage\n"
        + _u("1")
        + _u("cpu")
        + b"\x8a\x08"
        + struct.pack("<q", numel)
        + b"tQ"
    )
    how = draw(st.sampled_from(["rebuild", "build_set", "ctor", "bytearray", "unknown_first"]))
    if how == "build_set":  # a good tensor, then BUILD (storage, offset, size, stride): tensor.set_(*state)
        value = _T + b"(" + pid + b"\x8a\x08" + struct.pack("<q", offset) + tup(size) + tup(stride) + b"tb"
    elif how == "ctor":
        value = b"ctorch\nFloatTensor\n" + tup(size) + b"R"
    elif how == "bytearray":
        value = b"cbuiltins\nbytearray\n\x8a\x08" + struct.pack("<q", size[0]) + b"\x85R"
    else:
        value = b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"\x8a\x08" + struct.pack("<q", offset) + tup(size)
        value += tup(stride) + b"\x89ccollections\nOrderedDict\n)RtR"
    first = b"cfuzz_missing_pkg\nCfg\n)\x81" + b"s" if how == "unknown_first" else b""
    head = (_u("cfg") + first) if first else b""
    return b"\x80\x02}" + head + _u("w") + value + b"s.", numel


def _deflated_zip(pkl: bytes, records: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def hostile_pickles(case):
    kind, pkl, deflate, storage_bytes = case
    records = {"0": struct.pack("<4f", 1, 2, 3, 4), "1": bytes(storage_bytes)}
    data = _deflated_zip(pkl, records) if deflate else as_zip(pkl, records)
    exercise(put(data, f"hostile-{kind}.pt"))


_HUGE = [0, 1, 2, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**29]


@st.composite
def hostile_header(draw) -> bytes:
    """safetensors with huge or many dims, reserved metadata keys used as tensor and alias
    names, and long or wide alias chains."""
    header: dict = {}
    rank = draw(st.sampled_from([0, 1, 2, 63, 64, 65, 70]))
    shape = [draw(st.sampled_from(_HUGE)) if draw(st.booleans()) else 1 for _ in range(rank)]
    if rank and draw(st.booleans()):
        shape[draw(st.integers(0, rank - 1))] = 0
    code = draw(st.sampled_from(["F64", "F32", "U8", "BOOL"]))
    nbytes = {"F64": 8, "F32": 4, "U8": 1, "BOOL": 1}[code]
    for d in shape:
        nbytes *= d
    if nbytes > 4096:  # a file cannot hold it: keep the header valid, the shape small
        shape = [1] * rank
        nbytes = {"F64": 8, "F32": 4, "U8": 1, "BOOL": 1}[code]
    name = draw(st.sampled_from(["w", "format", "wsurgery.aliases", "wsurgery.x", "a" * 100_000]))
    header[name] = {"dtype": code, "shape": shape, "data_offsets": [0, nbytes]}
    header["v"] = {"dtype": "F32", "shape": [2, 3], "data_offsets": [nbytes, nbytes + 24]}
    table: dict = {}
    links = draw(st.sampled_from([0, 1, 5, 64, 65, 200]))
    steps = draw(st.sampled_from([0, 1, 2, 1024, 1025, 5000]))
    step = draw(st.sampled_from(["same", "transpose", "reshape(3,2)", "reshape(100000000000000000000000000000,0)",
                                 "reshape(" + ",".join(["1"] * 65) + ")", "slice(0,0,1)"]))  # fmt: skip
    prev = "v"
    for i in range(links):
        alias = draw(st.sampled_from([f"c{i}", f"c{i}", "format", "wsurgery.aliases", "wsurgery.y", "w"]))
        table[alias] = {"source": prev, "transform": [step] * steps}
        prev = alias
    for i in range(draw(st.sampled_from([0, 10, 3000]))):
        table[f"fan{i}"] = {"source": prev, "transform": [step] * min(steps, 64)}
    meta = {"format": "pt"}
    if table:
        meta["wsurgery.aliases"] = json.dumps(table)
    for key in draw(
        st.lists(st.sampled_from(["format", "wsurgery.aliases", "wsurgery.z", "c0", "fan0", "note"]), max_size=3)
    ):
        meta[key] = draw(st.sampled_from(["v", "pt", "w", "{}", "x" * 100]))
    obj = {"__metadata__": meta, **header}
    text = json.dumps(obj).encode()
    return struct.pack("<Q", len(text)) + text + bytes(nbytes + 24)


def hostile_safetensors(data):
    exercise(put(data, "hostile.safetensors"))


RESERVED_NAMES = st.sampled_from(["format", "wsurgery.aliases", "wsurgery.x", "a", "a.b", "b", "note", ""])


def reserved_names_round_trip(case):
    """Tensors named like reserved metadata keys, tied by shared storage, round-trip through a
    torch file and safetensors: every tie survives and the metadata stays readable."""
    names, tie_to = case
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    sd = {}
    for i, name in enumerate(names):
        sd[name] = base if i in tie_to else torch.full((2, 3), float(i))
    path = workdir() / "reserved.pt"
    torch.save(sd, path)
    TRIED["inputs"] += 1
    out = workdir() / "reserved.safetensors"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    ckpt = wsurgery.load(path)
    ckpt.save(out)
    back = wsurgery.load(out)
    assert set(back.names()) == set(sd) and back.metadata.get("format", "pt") == "pt"
    for name, t in sd.items():
        assert torch.equal(back.tensor(name), t), name
    assert {n: a.source for n, a in back.aliases.items()} == {n: a.source for n, a in ckpt.aliases.items()}
    TRIED["loaded"] += 1


# name -> (strategy of one input, target): the tests below and fuzz/campaign.py share them.
TARGETS = {
    "mutated_safetensors": (mutated(SAFETENSORS_SEED), mutated_safetensors),
    "mutated_safetensors_header": (_header_mutation_targets(), mutated_safetensors_header),
    "structural_safetensors": (plausible_safetensors(), structural_safetensors),
    "mutated_torch_files": (
        st.sampled_from(sorted(TORCH_SEEDS)).flatmap(lambda k: mutated(TORCH_SEEDS[k]).map(lambda d: (k, d))),
        mutated_torch_files,
    ),
    "structural_pickles": (
        st.tuples(
            st.booleans().flatmap(lambda legacy: st.tuples(st.just(legacy), pickle_program(legacy))),
            st.sampled_from([16, 16, 0, 4, 20]),
        ),
        structural_pickles,
    ),
    "state_dict_round_trip": (
        st.tuples(
            st.lists(
                (NAMES | st.text(max_size=40)).filter(lambda n: n != "__metadata__"),
                min_size=1,
                max_size=6,
                unique=True,
            ),
            st.lists(st.lists(st.integers(0, 5), max_size=3).map(tuple), min_size=6, max_size=6),
            st.booleans(),
        ),
        state_dict_round_trip,
    ),
    "sharded_index": (
        st.tuples(
            st.dictionaries(NAMES | st.text(max_size=8), st.sampled_from(SHARD_PATHS), max_size=5),
            st.sampled_from(INDEX_METADATA),
        ),
        sharded_index,
    ),
    "hostile_pickles": (hostile_program(), hostile_pickles),
    "hostile_safetensors": (hostile_header(), hostile_safetensors),
    "reserved_names_round_trip": (
        st.tuples(st.lists(RESERVED_NAMES, min_size=1, max_size=5, unique=True), st.sets(st.integers(0, 4))),
        reserved_names_round_trip,
    ),
}
HOSTILE_TARGETS = ("hostile_pickles", "hostile_safetensors", "reserved_names_round_trip")


def property_test(name: str, profile: settings):
    """The hypothesis test of one target under ``profile``."""
    strategy, target = TARGETS[name]
    return settings(profile)(given(strategy)(target))


test_mutated_safetensors = property_test("mutated_safetensors", settings.get_profile(PROFILE))
test_mutated_safetensors_header = property_test("mutated_safetensors_header", settings.get_profile(PROFILE))
test_structural_safetensors_and_alias_metadata = property_test("structural_safetensors", settings.get_profile(PROFILE))
test_mutated_torch_files = property_test("mutated_torch_files", settings.get_profile(PROFILE))
test_structural_pickles = property_test("structural_pickles", settings.get_profile(PROFILE))
test_sharded_index = property_test("sharded_index", settings.get_profile(PROFILE))
test_state_dict_round_trip = property_test("state_dict_round_trip", settings.get_profile(PROFILE))


def test_the_seeds_themselves_load():
    """The mutations start from valid files, so the properties reach past the first check."""
    assert exercise(put(SAFETENSORS_SEED, "seed.safetensors")) == "loaded"
    for kind, data in TORCH_SEEDS.items():
        assert exercise(put(data, f"seed-{kind}.pt")) == "loaded", kind
    c = wsurgery.load(workdir() / "seed-lightning.pt")
    assert any("placeholders for fuzz_missing_pkg.Cfg" in s for s in c.skipped), c.skipped
    assert c.aliases["wt"].specs == ["transpose"]
    c.close()


def test_structural_pickle_snippet_is_a_real_tensor():
    pkl = b"\x80\x02}" + _u("w") + _tensor_snippet("0", 4, (2, 2)) + b"s."
    path = put(as_zip(pkl, {"0": struct.pack("<4f", 1, 2, 3, 4)}), "snippet.pt")
    assert wsurgery.load_state_dict(path)["w"].tolist() == [[1, 2], [3, 4]]
    pkl = b"\x80\x02}" + _u("w") + _tensor_snippet("0", 4, (2, 2), legacy=True) + b"s."
    legacy = put(as_legacy(pkl, [("0", 4)]), "snippet-legacy.pt")
    assert wsurgery.load_state_dict(legacy)["w"].shape == (2, 2)


def test_hostile_generators_in_a_bounded_process():
    """The hostile targets build bombs at full size: run them in a child with an address-space
    limit and a timeout (tests/bounded.py), so a regression fails instead of swapping."""
    from ..bounded import bounded

    n = max(1, int(os.environ.get("WSURGERY_FUZZ_EXAMPLES", "100")) // 10)
    code = (
        "import tests.fuzz.test_formats as f\n"
        "from hypothesis import settings\n"
        "for name in f.HOSTILE_TARGETS:\n"
        f"    f.property_test(name, settings(settings.get_profile(f.PROFILE), max_examples={n}))()\n"
        "print(f.TRIED)\n"
    )
    r = bounded(code=code, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
