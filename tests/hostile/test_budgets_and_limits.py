"""Budgets and limits: pickle bombs, alias chains, shapes torch cannot hold, sizes, file modes
and colliding keys, refused in bounded time and memory.

Each reproducer is built by a seeded factory in a temporary folder; the bombs and hangs run
in one child process under an address-space limit, a watchdog per case and a timeout
(:func:`tests.bounded.run_cases`), so a regression fails its test instead of swapping the
machine or stalling the suite. ``BOMBS`` lists them; ``python -m tests.hostile.test_budgets_and_limits
[NAME...]`` prints the time and peak memory of each, one child per case
(``WSURGERY_PYTHONPATH=old/tree`` measures another checkout).
"""

from __future__ import annotations

import collections
import json
import os
import stat
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.numpy import save_file

import wsurgery
from wsurgery import aliases as alias_codec
from wsurgery import transforms as T
from wsurgery.errors import HeaderError, InputError, TransformError, UsageError
from wsurgery.io import pickles
from wsurgery.io.safetensors import read_header
from wsurgery.io.sharded_writer import parse_size
from wsurgery.io.writer import atomic_file
from wsurgery.limits import shape_problem

from ..bounded import bounded, run_cases
from ..hostile.test_pickles import Call, Rebuild, Storage, dumps, floats, make_legacy, make_zip

# --- factories -------------------------------------------------------------------------------------


class Unknown:
    """An instance of a class that is not installed: torch refuses it, the restricted route reads it."""


def _unknown_module(monkeypatch=None):
    """Register ``Unknown`` under a module that is not installed (to pickle it)."""
    import types

    mod = types.ModuleType("round2_missing_pkg")
    Unknown.__module__, Unknown.__qualname__ = "round2_missing_pkg", "Unknown"
    mod.Unknown = Unknown
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, "round2_missing_pkg", mod)
    else:
        sys.modules["round2_missing_pkg"] = mod


class RebuildThenSet:
    """Pickles as ``_rebuild_tensor_v2(...)`` followed by BUILD ``(storage, offset, size, stride)``:
    torch.load's weights-only unpickler runs ``tensor.set_(*state)`` on it."""

    def __init__(self, base: Rebuild, state):
        self.base, self.state = base, state

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.base.args, self.state)


VIEW_ELEMENTS = 2**27  # float32: a 512 MiB view, which a normal run under the test's limit could still allocate


def empty_storage_view_zip(tmp: Path) -> Path:
    """A zip whose storage claims 0 bytes, viewed as 512 MiB, with an unknown class that forces
    the restricted route (where torch's ``set_`` used to grow the empty storage)."""
    _unknown_module()
    pkl = dumps({"cfg": Unknown(), "w": Rebuild(Storage("0", numel=0), size=(VIEW_ELEMENTS,))})
    return make_zip(tmp / "empty-view.pt", pkl, {"0": b""})


def empty_storage_view_legacy(tmp: Path) -> Path:
    """The same in the legacy format (on the restricted route too)."""
    _unknown_module()
    main = dumps({"cfg": Unknown(), "w": Rebuild(Storage("1", numel=0, legacy=True), size=(VIEW_ELEMENTS,))})
    return make_legacy(tmp / "empty-view-legacy.pt", main, [("1", 0, b"")])


def build_set_view_legacy(tmp: Path) -> Path:
    """A legacy tensor that a BUILD then ``set_``s to a 512 MiB view of an empty storage: torch.load's
    own route, whose legacy storages are resizable."""
    t = RebuildThenSet(
        Rebuild(Storage("1", numel=4, legacy=True)), (Storage("2", numel=0, legacy=True), 0, (VIEW_ELEMENTS,), (1,))
    )
    return make_legacy(tmp / "build-set.pt", dumps({"w": t}), [("1", 4, floats(1, 2, 3, 4)), ("2", 0, b"")])


def tensor_constructor(tmp: Path) -> Path:
    """``torch.FloatTensor(2**27)``: an allow-listed type whose call allocates 512 MiB."""
    return make_zip(tmp / "ctor.pt", dumps({"w": Call(torch.FloatTensor, VIEW_ELEMENTS)}))


def bytearray_of_a_size(tmp: Path) -> Path:
    """``bytearray(2**29)``: 512 MiB of zeros, written by torch.load itself."""
    return make_zip(tmp / "bytearray.pt", dumps({"w": Rebuild(Storage("0")), "b": Call(bytearray, 2**29)}),
                    {"0": floats(1, 2, 3, 4)})  # fmt: skip


def qtensor_of_a_size(tmp: Path) -> Path:
    """``_rebuild_qtensor`` of a 2**27-element stride-0 view: torch allocates it whole first."""
    q = Call(torch._utils._rebuild_qtensor, Storage("0", stype=torch.QUInt8Storage, numel=1), 0, (VIEW_ELEMENTS,),
             (0,), (torch.per_tensor_affine, 1.0, 0), False, collections.OrderedDict())  # fmt: skip
    return make_zip(tmp / "qtensor.pt", dumps({"q": q}), {"0": b"\x01"})


def cpu_tensor_cast(tmp: Path) -> Path:
    """A stride-0 view of 2**26 elements that ``_rebuild_device_tensor_from_cpu_tensor`` casts (materialises)."""
    view = Rebuild(Storage("0", numel=1), size=(2**26,), stride=(0,))
    t = Call(torch._utils._rebuild_device_tensor_from_cpu_tensor, view, torch.float64, "cpu", False)
    return make_zip(tmp / "cast.pt", dumps({"w": t}), {"0": floats(1)})


def deflated_pickle(tmp: Path, name: str, pkl: bytes) -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def memo_bomb(tmp: Path) -> Path:
    """The issue's 24.5 KB file: one dict memoized 25 million times (3 GB in the old interpreter)."""
    return deflated_pickle(tmp, "memo.pt", b"\x80\x04}" + b"\x94" * 25_000_000 + b".")


def stack_bomb(tmp: Path) -> Path:
    """25 million empty dicts left on the stack (then a balanced STOP it never reaches)."""
    return deflated_pickle(tmp, "stack.pt", b"\x80\x04" + b"}" * 25_000_000 + b"0" * 24_999_999 + b".")


def copy_bomb(tmp: Path) -> Path:
    """``set(big)`` over and over: each call copies a 10,000-item list (the copies are kept)."""
    big = b"](" + b"".join(b"J" + struct.pack("<i", i) for i in range(10_000)) + b"e\x94"  # memo 0
    calls = b"cbuiltins\nset\n\x940" + b"h\x01h\x00\x85Ra" * 100_000  # memo 1, popped; set(big) appended
    pkl = b"\x80\x04}\x8c\x01s" + big + b"0]" + calls + b"s."
    return deflated_pickle(tmp, "copies.pt", pkl)


def shared_subdicts(tmp: Path, levels: int = 40) -> Path:
    """``d = {"a": d, "b": d}`` 40 times over: 2 KB, 2**40 paths to the one tensor."""
    d = {"w": torch.ones(1)}
    for _ in range(levels):
        d = {"a": d, "b": d}
    torch.save(d, tmp / "shared.pt")
    return tmp / "shared.pt"


def placeholder_scan(tmp: Path, keys: int = 20_000, items: int = 10**6) -> Path:
    """The issue's file, smaller: 20,000 keys naming one list of a million Nones."""
    big = [None] * items
    torch.save({"w": torch.ones(1), **{f"k{i}": big for i in range(keys)}}, tmp / "scan.pt")
    return tmp / "scan.pt"


def alias_chain(tmp: Path, links: int = 64, steps: int = 25_000) -> Path:
    """64 alias records chained, each of 25,000 ``same`` steps: a 16 MB header."""
    table = {"a0": {"source": "w", "transform": ["same"] * steps}}
    for i in range(1, links):
        table[f"a{i}"] = {"source": f"a{i - 1}", "transform": ["same"] * steps}
    path = tmp / "chain.safetensors"
    save_file({"w": _np_ones(4)}, str(path), metadata={"format": "pt", "wsurgery.aliases": json.dumps(table)})
    return path


def alias_fan(tmp: Path, aliases: int = 20_000, steps: int = 60) -> Path:
    """Thousands of aliases at the end of one long transformed chain: each composes it all."""
    table = {"t0": {"source": "w", "transform": ["transpose"] * steps}}
    for i in range(1, 16):
        table[f"t{i}"] = {"source": f"t{i - 1}", "transform": ["transpose"] * steps}
    for i in range(aliases):
        table[f"x{i}"] = {"source": "t15", "transform": ["transpose"]}
    path = tmp / "fan.safetensors"
    save_file({"w": _np_ones(2, 3)}, str(path), metadata={"format": "pt", "wsurgery.aliases": json.dumps(table)})
    return path


def colliding_keys(tmp: Path, n: int = 60_000) -> Path:
    """A dict of ints that all hash alike (``k * (2**61 - 1)``): each insertion compares with all before."""
    items = b"".join(b"\x8a\x0a" + (k * ((1 << 61) - 1)).to_bytes(10, "little", signed=True) + b"N" for k in range(n))
    return make_zip(tmp / "collide.pt", b"\x80\x02}(" + items + b"u.")


def shared_tuple_key(tmp: Path, levels: int = 40) -> Path:
    """A dict key ``t = (t, t)`` 40 levels deep: 2**40 elements to hash, in 100 bytes."""
    return make_zip(tmp / "tuple-key.pt", b"\x80\x02}" + b")" + b"2\x86" * levels + b"Ns.")


_TENSOR = (  # _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 4), 0, (4,), (1,), False, OrderedDict())
    b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
    b"X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
)


def deep_names(tmp: Path, depth: int = 20_000) -> Path:
    """A chain of dicts 20,000 deep, one tensor at every level: names of quadratic total length
    (too deep for torch.save's recursion: pickled by hand, the tensor memoized once)."""
    body = b"\x80\x02" + _TENSOR + b"q\x000" + b"}(" + b"X\x01\x00\x00\x00k}(" * depth
    body += b"X\x01\x00\x00\x00wh\x00u" * (depth + 1) + b"."
    return make_zip(tmp / "deep.pt", body, {"0": floats(1, 2, 3, 4)})


def many_legacy_storages(tmp: Path, n: int = 25_000) -> Path:
    """A legacy file with 25,000 storages (the storage-key check rebuilt a set per storage: 36 s)."""
    main = dumps({f"t{i}": Rebuild(Storage(str(i), numel=1, legacy=True), size=(1,)) for i in range(n)})
    return make_legacy(tmp / "many.pt", main, [(str(i), 1, floats(i)) for i in range(n)])


def duplicate_entry_last(tmp: Path, n: int = 40_000) -> Path:
    """A zip of 40,000 long names whose last repeats one (the duplicate search counted each name: 35 s)."""
    names = [f"archive/x/{'p' * 300}{i}" for i in range(n)]
    path = make_zip(tmp / "dups.pt", dumps({}), extra=[(name, b"") for name in names])
    with zipfile.ZipFile(path, "a") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        z.writestr(names[-1], b"")
    return path


def _np_ones(*shape):
    import numpy as np

    return np.ones(shape, dtype=np.float32)


# name -> (factory, how the child reads it): the cases of the batch below
BOMBS = {
    "empty_storage_view_zip": (empty_storage_view_zip, "load"),
    "empty_storage_view_legacy": (empty_storage_view_legacy, "load"),
    "build_set_view_legacy": (build_set_view_legacy, "load"),
    "tensor_constructor": (tensor_constructor, "load"),
    "bytearray_of_a_size": (bytearray_of_a_size, "load"),
    "qtensor_of_a_size": (qtensor_of_a_size, "load"),
    "cpu_tensor_cast": (cpu_tensor_cast, "load"),
    "memo_bomb": (memo_bomb, "load"),
    "stack_bomb": (stack_bomb, "load"),
    "copy_bomb": (copy_bomb, "load"),
    "shared_subdicts": (shared_subdicts, "load"),
    "deep_names": (deep_names, "load"),
    "placeholder_scan": (placeholder_scan, "load"),
    "alias_chain": (alias_chain, "load"),
    "alias_fan": (alias_fan, "load"),
    "colliding_keys": (colliding_keys, "load"),
    "shared_tuple_key": (shared_tuple_key, "load"),
    "many_legacy_storages": (many_legacy_storages, "scan-legacy"),
    "duplicate_entry_last": (duplicate_entry_last, "scan-zip"),
}


def _build(tmp: Path, names) -> list[tuple[str, str, str]]:
    cases = []
    for name in names:
        factory, mode = BOMBS[name]
        folder = tmp / name
        folder.mkdir()
        cases.append((name, mode, str(factory(folder))))
    return cases


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Every reproducer of ``BOMBS``, read in one bounded child: name -> its ``Case``. Each takes
    at most 3 s when fixed, and at least 20 s (or the address space) when not: a case past the
    15 s watchdog is a hang."""
    return run_cases(_build(tmp_path_factory.mktemp("bombs"), BOMBS), per_case_s=15)


def assert_refused_small(case, *needles, mib: float = 200):
    """Refused with the rule in the message, in time, raising the child's peak memory by less
    than ``mib`` (a bomb that came back would take hundreds of MiB, or the address space)."""
    assert case.outcome == "refused", (case.name, case.outcome, case.message)
    for needle in needles:
        assert needle in case.message, case.message
    assert case.rss_growth_mib < mib, (case.name, case.rss_growth_mib)


# --- 1. reserved metadata keys ---------------------------------------------------------------------


def _metadata(path) -> dict:
    return read_header(path).metadata or {}


@pytest.mark.parametrize("name", ["wsurgery.aliases", "format", "wsurgery.version"])
def test_an_alias_named_like_a_reserved_key_keeps_the_metadata(tmp_path, name):
    t = torch.arange(4.0)
    torch.save({"a": t, name: t}, tmp_path / "in.pt")
    out = tmp_path / "out.safetensors"
    wsurgery.load(tmp_path / "in.pt").save(out)
    meta = _metadata(out)
    assert meta["format"] == "pt"
    assert json.loads(meta["wsurgery.aliases"])[name] == {"source": "a", "transform": []}
    back = wsurgery.load(out)
    assert back.aliases[name].source == "a" and torch.equal(back.tensor(name), t)


def test_the_convention_entry_never_writes_over_user_metadata():
    records = {"note": alias_codec.AliasRecord("w", ()), "w2": alias_codec.AliasRecord("w", ())}
    meta = alias_codec.encode(records, {"note": "hello", "wsurgery.version": "1"})
    assert meta["note"] == "hello" and meta["w2"] == "w" and meta["wsurgery.version"] == "1"
    assert json.loads(meta["wsurgery.aliases"])["note"] == {"source": "w", "transform": []}
    # read back: the record makes the tie, the user's entry stays metadata
    resolved, others = alias_codec.decode(meta, {"w": ((2,), "float32")}, "<m>")
    assert resolved["note"].source == "w" and others["note"] == "hello" and "w2" not in others


def test_an_older_convention_entry_is_rewritten_not_kept():
    records = {"wt": alias_codec.AliasRecord("w", ("transpose",))}
    meta = alias_codec.encode(records, {"wt": "w"})  # from before the tie gained a transform
    assert "wt" not in meta
    meta = alias_codec.encode(records, {}, convention=False)
    assert set(meta) == {"format", "wsurgery.aliases"}


def test_decode_never_reads_a_reserved_key_as_an_alias():
    stored = {"format": ((2,), "float32"), "w": ((2,), "float32")}
    resolved, others = alias_codec.decode({"format": "w", "wsurgery.x": "w"}, {"w": ((2,), "float32")}, "<m>")
    assert resolved == {} and others == {"format": "w", "wsurgery.x": "w"}
    table = json.dumps({"format": {"source": "w", "transform": []}})
    resolved, others = alias_codec.decode({"wsurgery.aliases": table, "format": "pt"}, {"w": stored["w"]}, "<m>")
    assert resolved["format"].source == "w" and others == {"format": "pt"}


# --- 2. two tensors flatten to one name -------------------------------------------------------------


def test_two_tensors_flattening_to_one_name_are_an_input_error(tmp_path):
    torch.save({"a.b": torch.ones(2), "a": {"b": torch.zeros(3)}}, tmp_path / "clash.pt")
    with pytest.raises(InputError, match=r"two tensors flatten to the name 'a.b': \['a.b'\] and \['a'\]\['b'\]"):
        wsurgery.load(tmp_path / "clash.pt")


def test_a_flattening_clash_under_a_container_names_it(tmp_path):
    torch.save({"state_dict": {"x": {"y.z": torch.ones(1)}, "x.y": {"z": torch.ones(1)}}}, tmp_path / "c.pt")
    with pytest.raises(InputError, match=r"\['state_dict'\]\['x'\]\['y.z'\] and \['state_dict'\]\['x.y'\]\['z'\]"):
        wsurgery.load(tmp_path / "c.pt")


def test_a_modules_parameter_and_buffer_of_one_name_clash(tmp_path):
    m = torch.nn.Linear(2, 2)
    m._buffers["weight"] = torch.zeros(2, 2)  # a name torch's API would refuse twice
    torch.save(m, tmp_path / "m.pt")
    with pytest.raises(InputError, match="'weight': parameter 'weight' of module '.root.' and buffer 'weight'"):
        wsurgery.load(tmp_path / "m.pt")


def test_a_shared_sub_dict_is_a_tie_under_each_name(tmp_path):
    sd = {"w": torch.arange(3.0)}
    torch.save({"model": {"enc": sd}, "ema": {"enc": sd}}, tmp_path / "ema.pt")
    c = wsurgery.load(tmp_path / "ema.pt")
    assert set(c.names()) == {"model.enc.w", "ema.enc.w"}
    assert c.aliases["model.enc.w"].source == "ema.enc.w"


# --- 4. a view larger than its storage --------------------------------------------------------------

VIEW_NEEDLES = ("reaches 536870912 bytes into a storage of 0", "a view larger than its storage")


@pytest.mark.parametrize(
    "name, needles",
    [
        ("empty_storage_view_zip", VIEW_NEEDLES),
        ("empty_storage_view_legacy", VIEW_NEEDLES),
        ("build_set_view_legacy", VIEW_NEEDLES),
        ("tensor_constructor", ("calls torch.FloatTensor with arguments",)),
        ("bytearray_of_a_size", ("bytearray built from",)),
        ("qtensor_of_a_size", ("134217728 elements would take 134217728 bytes", "size bomb")),
        ("cpu_tensor_cast", ("67108864 elements would take 536870912 bytes", "size bomb")),
    ],
)
def test_what_torch_would_allocate_is_refused_first(bombs, name, needles):
    """Each file is under 1 KB and asks for 128 to 512 MiB."""
    assert_refused_small(bombs[name], *needles)


def test_the_restricted_route_checks_views_itself(tmp_path):
    """Even when handed a layout the scan would have refused, ``set_`` never grows a storage."""
    from wsurgery.io.pickles.layout import Layout, _Claim
    from wsurgery.io.pickles.load import _restricted_load

    path = empty_storage_view_zip(tmp_path)
    layout = Layout(str(path), path.stat().st_size, True, zipfile.ZipFile(path).read("archive/data.pkl"), (0, 0),
                    {"0": (0, 0)}, {"0": _Claim("0", "float32", 4, 0)}, False, [])  # fmt: skip
    with pytest.raises(InputError, match="a view larger than its storage"):
        _restricted_load(layout)


def test_an_in_bounds_build_set_still_loads(tmp_path):
    t = RebuildThenSet(Rebuild(Storage("1", numel=4, legacy=True)), (Storage("1", numel=4, legacy=True), 1, (2,), (1,)))
    path = make_legacy(tmp_path / "set.pt", dumps({"w": t}), [("1", 4, floats(1, 2, 3, 4))])
    assert wsurgery.load_state_dict(path)["w"].tolist() == [2, 3]


# --- 5. memory bombs in the pickle interpreter -----------------------------------------------------


@pytest.mark.parametrize("name", ["memo_bomb", "stack_bomb", "copy_bomb"])
def test_pickle_memory_is_bounded_by_the_files_size(bombs, name):
    """Files of 17 to 49 KB that asked for 1.6 to 50 GB."""
    assert_refused_small(bombs[name], "objects, more than a file of its size describes")


def test_a_bomb_through_the_command_line_is_one_line_and_exit_3(tmp_path):
    r = bounded(cli=["inspect", memo_bomb(tmp_path)], timeout=60)
    assert r.returncode == 3 and r.last_line.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "objects, more than a file of its size describes" in r.last_line
    assert r.peak_rss_mib is not None and r.peak_rss_mib < 600, r.peak_rss_mib


def test_an_honest_pickle_stays_within_its_budget(tmp_path, monkeypatch):
    """An honest pickle spends less than one unit per byte of its file: long lists of ints
    (1 to 5 bytes an item), nested optimizer state and many tensors load with the fixed floor
    of the budget far below what they spend."""
    from wsurgery.io.pickles import interpreter

    monkeypatch.setattr(interpreter, "MIN_BUDGET", 1000)
    sd = {f"layer.{i}.w": torch.full((1,), float(i)) for i in range(300)}
    extra = {"ids": list(range(20_000)), "zeros": [0] * 20_000, "opt": {i: {"step": i} for i in range(1000)}}
    torch.save({"state_dict": sd, **extra}, tmp_path / "big.pt")
    c = wsurgery.load(tmp_path / "big.pt")
    assert len(c.names()) == 300 and c.tensor("layer.299.w").item() == 299
    torch.save({"w": torch.ones(1), "zeros": [0] * 20_000}, tmp_path / "zeros.pt", _use_new_zipfile_serialization=False)
    assert wsurgery.load(tmp_path / "zeros.pt").names() == ["w"]


# --- 6, 7: walks over shared containers ---------------------------------------------------------------


def test_shared_sub_dicts_are_refused_naming_the_shared_dict(bombs):
    case = bombs["shared_subdicts"]
    assert_refused_small(case, "gives more tensor names than", "['a']['a']['a'][...]['a']['a']['a']['a'] is also at")
    assert "['a']['a']['a'][...]['a']['a']['a']['b']: a container shared by many paths" in case.message


def test_names_of_deeply_nested_dicts_are_bounded(bombs):
    assert_refused_small(
        bombs["deep_names"], "gives more tensor names than", "nest too deep or their keys are too long"
    )


def test_describing_a_list_shared_by_many_keys_is_linear(bombs):
    case = bombs["placeholder_scan"]
    assert case.outcome == "loaded" and case.names == 1 and case.skipped == 20_000, case


def test_the_placeholder_search_has_one_budget_for_the_whole_checkpoint():
    from wsurgery.io.pickles.state_dict import _Describer

    shared = [pickles.Placeholder("pkg.Cfg")] * 1000
    describe = _Describer(budget=5000)
    texts = [describe([shared]) for _ in range(1000)]
    assert texts[0] == "list holding placeholders for pkg.Cfg"  # found within the budget
    assert texts[-1] == "list" and describe.left == 0  # later walks stopped at the budget
    assert describe(shared) == describe(shared) == "list"  # a value is searched once


# --- 8. alias chains ------------------------------------------------------------------------------------


def test_a_long_transform_record_is_refused_quickly(bombs):
    """A 16 MB header: parsing its JSON alone takes some 200 MiB."""
    assert_refused_small(bombs["alias_chain"], "alias 'a0' has a transform of 25000 steps (at most 1024)", mib=400)


def test_the_steps_composed_over_all_aliases_are_bounded(bombs):
    assert_refused_small(bombs["alias_fan"], "resolving its aliases composes more than 1000000 transform steps")


def test_a_chain_composing_too_many_steps_is_refused():
    table = {"t0": {"source": "w", "transform": ["transpose"] * 600}}
    table["t1"] = {"source": "t0", "transform": ["transpose"] * 600}
    with pytest.raises(InputError, match=r"alias 't1' composes a chain of 1200 transform steps \(at most 1024\)"):
        alias_codec.decode({"wsurgery.aliases": json.dumps(table)}, {"w": ((2, 3), "float32")}, "<m>")


def test_many_aliases_of_one_chain_resolve_each_link_once(tmp_path):
    table = {"c0": {"source": "w", "transform": ["transpose"]}}
    for i in range(1, 60):
        table[f"c{i}"] = {"source": f"c{i - 1}", "transform": ["transpose", "same"]}
    for i in range(1000):
        table[f"x{i}"] = {"source": "c59", "transform": []}
    path = tmp_path / "fan.safetensors"
    save_file({"w": _np_ones(2, 3)}, str(path), metadata={"format": "pt", "wsurgery.aliases": json.dumps(table)})
    c = wsurgery.load(path)
    assert c.aliases["x999"].specs == ["transpose"] * 60 and c.shape_dtype("x0")[0] == (2, 3)


def test_a_budget_of_composed_steps(monkeypatch):
    monkeypatch.setattr(alias_codec, "MAX_ALIAS_STEPS", 100)
    table = {f"x{i}": {"source": "w", "transform": ["transpose"] * 2} for i in range(60)}
    meta = {"wsurgery.aliases": json.dumps(table)}
    with pytest.raises(InputError, match="composes more than 100 transform steps"):
        alias_codec.decode(meta, {"w": ((2, 3), "float32")}, "<m>")


# --- 12. valid headers torch cannot hold -----------------------------------------------------------------


def _header_file(tmp_path, header: dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize(
    "shape, dtype, nbytes, rule",
    [
        ([1] * 65, "F32", 4, r"65 dimensions \(at most 64\)"),
        ([0, 2**64 - 1], "F64", 0, "a size of 18446744073709551615, past int64"),
        ([2**63, 0], "U8", 0, "past int64"),
        ([0, 2**40, 2**40], "F32", 0, "strides that overflow int64"),
    ],
)
def test_a_header_shape_torch_cannot_hold_is_an_input_error(tmp_path, cli, shape, dtype, nbytes, rule):
    path = _header_file(tmp_path, {"x": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * nbytes)
    with pytest.raises(HeaderError, match=rule):
        read_header(path)
    code, _, stderr = cli("inspect", path)
    assert code == 3 and "which no torch tensor can have" in stderr


@pytest.mark.parametrize(
    "shape, dtype, nbytes", [([2**63 - 1, 0], "U8", 0), ([1] * 64, "F32", 4), ([2**61, 4, 0], "U8", 0)]
)
def test_the_largest_shapes_torch_holds_are_valid(tmp_path, shape, dtype, nbytes):
    path = _header_file(tmp_path, {"x": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}, b"\0" * nbytes)
    assert read_header(path).tensors["x"].shape == tuple(shape)
    torch.empty(shape, dtype=torch.uint8, device="meta")  # and torch agrees


def test_an_alias_torch_cannot_hold_is_an_input_error(tmp_path, cli):
    path = tmp_path / "alias.safetensors"
    table = {"big": {"source": "z", "transform": [f"reshape({10**29},0)"]}}
    save_file({"z": _np_ones(0)}, str(path), metadata={"format": "pt", "wsurgery.aliases": json.dumps(table)})
    with pytest.raises(InputError, match="alias 'big' has a bad transform: .*is not a tensor torch can hold"):
        wsurgery.load(path)
    code, _, stderr = cli("untie", path, "-o", tmp_path / "out.safetensors")
    assert code == 3, stderr


@pytest.mark.parametrize(
    "specs, shape, rule",
    [
        (["reshape(100000000000000000000000000000,0)"], (0,), "a size of 1"),
        (["reshape(" + ",".join(["1"] * 65) + ")"], (1,), "at most 64 arguments"),
        (["reshape(4611686018427387904,4,0)"], (0,), "an element count that overflows"),
    ],
)
def test_a_transform_result_torch_cannot_hold_is_a_transform_error(specs, shape, rule):
    with pytest.raises(TransformError, match=rule):
        T.parse(specs).infer(shape, "float32")


@pytest.mark.parametrize("shape", [[2**63 - 1, 0], [1] * 64, [0, 2**62, 1]])
def test_shape_problem_agrees_with_torch(shape):
    torch.empty(shape, device="meta")
    assert shape_problem(shape, 4) is None


@pytest.mark.parametrize("shape", [[2**63, 0], [0, 2**40, 2**40], [2**62, 4, 0], [2**61]])
def test_shape_problem_refuses_what_torch_refuses(shape):
    with pytest.raises((RuntimeError, TypeError, OverflowError)):
        torch.empty(shape, dtype=torch.float32, device="meta")
    assert shape_problem(shape, 4)


def test_shape_problem_refuses_what_numpy_refuses():
    import numpy as np

    with pytest.raises(ValueError, match="maximum supported dimension"):
        np.empty([1] * 65)
    assert shape_problem([1] * 65, 4) == "65 dimensions (at most 64)" and shape_problem([1] * 64, 4) is None


# --- 13. overflowing numbers in arguments ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["1" + "0" * 310, "9" * 5000, "9223372036854775808", "99999999999999999999GiB"])
def test_a_huge_size_is_a_usage_error(text):
    with pytest.raises(UsageError, match="too large") as info:
        parse_size(text)
    assert info.value.param == "max_shard_size" and len(str(info.value)) < 200


def test_sizes_are_exact():
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("9223372036854775807") == 2**63 - 1
    assert parse_size("0.001kb") == 1


@pytest.mark.parametrize(
    "factor, dtype", [("1e30", "int64"), ("1000", "int8"), ("256", "uint8"), ("9.3e18", "int64"), ("2e19", "uint64")]
)
def test_an_integer_factor_the_dtype_cannot_hold_is_a_transform_error(factor, dtype):
    with pytest.raises(TransformError, match=rf"step 1 'scale\(.*\)': cannot scale a tensor of dtype {dtype} by"):
        T.parse([f"scale({factor})"]).infer((4,), dtype)
    t = torch.ones(4, dtype=getattr(torch, dtype))
    with pytest.raises(TransformError, match="does not fit"):
        T.parse([f"scale({factor})"]).apply(t)


def test_scale_with_a_huge_factor_in_copy_is_a_surgery_error(tmp_path, cli):
    save_file({"w": __import__("numpy").arange(4, dtype="int64")}, str(tmp_path / "i.safetensors"))
    code, _, stderr = cli("check", tmp_path / "i.safetensors", "--src", "w", "--dst", "w", "--transform", "scale(1e30)")
    assert code == 4 and "scale(1e+30)" in stderr and "Traceback" not in stderr, stderr


# --- minor: replaced files keep their mode -----------------------------------------------------------------


def test_a_replaced_file_keeps_its_mode(tmp_path):
    dest = tmp_path / "ro.safetensors"
    dest.write_bytes(b"old")
    dest.chmod(0o444)
    with atomic_file(dest) as f:
        f.write(b"new")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o444 and dest.read_bytes() == b"new"
    fresh = tmp_path / "new.safetensors"
    with atomic_file(fresh) as f:
        f.write(b"x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644 & ~_umask()


def test_in_place_keeps_a_read_only_inputs_mode(tmp_path, cli):
    path = tmp_path / "m.safetensors"
    save_file({"w": _np_ones(2, 2)}, str(path))
    path.chmod(0o440)
    code, _, stderr = cli("convert", path, "-o", path, "--in-place", "--force")
    assert code == 0, stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o440 and wsurgery.load(path).names() == ["w"]


def test_a_replaced_shard_folder_keeps_its_modes(tmp_path):
    from wsurgery.io.sharded_writer import INDEX_NAME

    folder = tmp_path / "shards"
    ckpt = wsurgery.Checkpoint.from_state_dict({"w": torch.zeros(2)})
    ckpt.save(folder, max_shard_size=64)
    (folder / INDEX_NAME).chmod(0o400)
    folder.chmod(0o700)
    ckpt.save(folder, max_shard_size=64, overwrite=True)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / INDEX_NAME).stat().st_mode) == 0o400
    assert stat.S_IMODE((folder / "model-00001-of-00001.safetensors").stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- siblings in the pickle layer ----------------------------------------------------------------------------


def test_keys_crafted_to_collide_are_refused_quickly(bombs):
    assert_refused_small(bombs["colliding_keys"], "distinct dict keys or set members share one hash")


def test_a_key_that_shares_itself_is_refused_before_hashing(bombs):
    assert_refused_small(bombs["shared_tuple_key"], "holds more than 4096 elements")


def test_many_legacy_storages_scan_in_linear_time(bombs):
    assert bombs["many_legacy_storages"].outcome == "loaded", bombs["many_legacy_storages"]


def test_a_duplicate_among_many_zip_entries_is_found_in_linear_time(bombs):
    assert_refused_small(bombs["duplicate_entry_last"], "zip entry 'archive/x/pppp", "appears twice")


def test_a_legacy_file_that_shrinks_while_scanned_is_an_input_error(tmp_path, monkeypatch):
    main = dumps({"w": Rebuild(Storage("1", numel=4, legacy=True))})
    path = make_legacy(tmp_path / "shrunk.pt", main, [("1", 4, floats(1, 2, 3, 4))])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16 - 4])  # cut inside the storage's 8-byte size record
    real = os.path.getsize
    monkeypatch.setattr(os.path, "getsize", lambda p: real(p) + 20)  # the size seen before it shrank
    with pytest.raises(InputError, match="starts past the end of the file|the file changed"):
        pickles.scan(str(path), zip_format=False)


def test_a_parameters_requires_grad_must_be_a_bool(tmp_path, monkeypatch):
    _unknown_module(monkeypatch)
    param = Call(torch._utils._rebuild_parameter, Rebuild(Storage("0")), 1, collections.OrderedDict())
    path = make_zip(tmp_path / "p.pt", dumps({"cfg": Unknown(), "w": param}), {"0": floats(1, 2, 3, 4)})
    with pytest.raises(InputError, match="requires_grad is 1, not a bool"):
        wsurgery.load(path)


def test_the_list_opcode_builds_the_list_torch_builds(tmp_path):
    """LIST (``(`` ... ``l``) used to append its list to the stack it was popping: the scan then saw
    a different stack from torch's, and checked other values than the ones torch would use."""
    pkl = b"\x80\x02}(X\x01\x00\x00\x00w" + _TENSOR + b"X\x03\x00\x00\x00ids(K\x01K\x02lu."
    path = make_zip(tmp_path / "list.pt", pkl, {"0": floats(1, 2, 3, 4)})
    c = wsurgery.load(path)
    assert c.tensor("w").tolist() == [1, 2, 3, 4] and "ids: list" in c.skipped


def test_an_integer_of_a_megabyte_is_refused(tmp_path):
    path = make_zip(tmp_path / "long.pt", b"\x80\x02}\x8b" + struct.pack("<i", 1 << 20) + b"\x01" * (1 << 20) + b"Ns.")
    with pytest.raises(InputError, match="an integer of 1048576 bytes"):
        wsurgery.load(path)


# --- the figures ---------------------------------------------------------------------------------------------


def _measure(argv: list[str]) -> int:
    """Time and peak memory of each reproducer, each in a child of its own."""
    import tempfile

    env = {"PYTHONPATH": os.environ["WSURGERY_PYTHONPATH"]} if os.environ.get("WSURGERY_PYTHONPATH") else None
    timeout = float(os.environ.get("WSURGERY_TIMEOUT", 60))
    for name in argv or list(BOMBS):
        with tempfile.TemporaryDirectory() as tmp:
            ((_, mode, path),) = _build(Path(tmp), [name])
            case = run_cases([(name, mode, path)], per_case_s=int(timeout), timeout=timeout + 30, env=env, cwd=tmp)
            case = case[name]
            figures = f"{case.wall_s or 0:.1f} s, peak RSS {case.peak_rss_mib or 0:.0f} MiB"
            size = Path(path).stat().st_size
            print(f"{name} ({size} bytes): {case.outcome}, {figures}: {case.message[-160:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_measure(sys.argv[1:]))
