"""Crafted safetensors files, alias metadata and sharded indexes: every broken rule is a
one-line input error (exit 3) that names the file and the rule, and nothing is written.
Valid corner cases (empty, zero-size, scalars, metadata only) are accepted."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save_file

import wsurgery
from wsurgery.errors import HeaderError, InputError
from wsurgery.io.safetensors import MAX_HEADER_SIZE, read_header

from ..conftest import run_module, sha256


def craft(path, header, data: bytes = b"", *, prefix: int | None = None, raw_header: bytes | None = None):
    """Write ``prefix`` (default: the header's length) + header JSON + data."""
    text = raw_header if raw_header is not None else json.dumps(header).encode("utf-8")
    n = len(text) if prefix is None else prefix
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


def entry(dtype="F32", shape=(2,), start=0, end=None):
    itemsize = {"F32": 4, "F16": 2, "I64": 8, "U8": 1, "BOOL": 1}.get(dtype, 4)
    size = itemsize
    for d in shape:
        size *= d
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + size if end is None else end]}


def listing(folder) -> set[str]:
    return set(os.listdir(folder))


def assert_refused(cli, path, rule: str, *, command=("inspect",)):
    """Exit 3, one stderr line naming the file and the rule, and no file left behind."""
    folder = path.parent if path.is_file() else path
    before = listing(folder)
    digest = sha256(path)
    out = folder / "out.safetensors"
    for args in (list(command), ["convert", "-o", str(out)]):
        code, stdout, stderr = cli(*args[:1], path, *args[1:])
        lines = stderr.strip().splitlines()
        assert code == 3, (args, code, stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert str(path.name) in lines[0], lines[0]
        assert rule in lines[0], lines[0]
        assert "Traceback" not in stderr
    assert listing(folder) == before, "a refused input left a file behind"
    assert sha256(path) == digest


# --- the file envelope --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7])
def test_short_file(tmp_path, cli, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    assert_refused(cli, path, "shorter than the 8-byte length prefix")


def test_length_prefix_past_the_end(tmp_path, cli):
    path = craft(tmp_path / "past.safetensors", {}, prefix=1000)
    assert_refused(cli, path, "runs past the end")


@pytest.mark.parametrize("n", [MAX_HEADER_SIZE + 1, 2**63, 2**64 - 1])
def test_absurd_length_prefix(tmp_path, cli, n):
    path = craft(tmp_path / "absurd.safetensors", {}, prefix=n)
    assert_refused(cli, path, f"header length {n} exceeds the limit")


def test_a_length_prefix_is_never_allocated(tmp_path):
    """A prefix just under the header limit, in a tiny file: nothing near it is allocated."""
    path = craft(tmp_path / "claims.safetensors", {}, prefix=MAX_HEADER_SIZE - 1)
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError, match="runs past the end"):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_header_not_utf8(tmp_path, cli):
    path = craft(tmp_path / "latin.safetensors", None, raw_header=b'{"\xff\xfe": 1}')
    assert_refused(cli, path, "not UTF-8")


@pytest.mark.parametrize("text", [b"{not json", b'{"a": {"dtype": "F32",', b"{}}", b"{" + b"[" * 100_000])
def test_header_not_json(tmp_path, cli, text):
    path = craft(tmp_path / "nojson.safetensors", None, raw_header=text)
    assert_refused(cli, path, "not valid JSON")


@pytest.mark.parametrize("text", [b"[1, 2]", b'"a string"', b"42", b"null", b"    "])
def test_header_not_an_object(tmp_path, cli, text):
    path = craft(tmp_path / "notobj.safetensors", None, raw_header=text)
    assert_refused(cli, path, "does not start with a JSON object")


@pytest.mark.parametrize(
    "text, key",
    [
        (
            b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], '
            b'"data_offsets": [1, 2]}}',
            "'a'",
        ),
        (b'{"a": {"dtype": "U8", "dtype": "F32", "shape": [1], "data_offsets": [0, 1]}}', "'dtype'"),
        (b'{"__metadata__": {"k": "1", "k": "2"}}', "'k'"),
    ],
)
def test_duplicate_keys(tmp_path, cli, text, key):
    path = craft(tmp_path / "dup.safetensors", None, raw_header=text, data=b"\0\0")
    assert_refused(cli, path, f"duplicate key {key}")


# --- tensor entries ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F128", "f32", "", None, 4, "I4"])
def test_unknown_dtype(tmp_path, cli, dtype):
    e = entry()
    e["dtype"] = dtype
    path = craft(tmp_path / "dtype.safetensors", {"t": e}, b"\0" * 8)
    assert_refused(cli, path, "unknown dtype")


@pytest.mark.parametrize(
    "shape, rule",
    [([-1], "negative dimension"), ([2, -3], "negative dimension")]
    + [(s, "not a list of integers") for s in ([1.5], ["2"], [True], "2", None, {"0": 2})],
)
def test_bad_shape(tmp_path, cli, shape, rule):
    e = entry()
    e["shape"] = shape
    path = craft(tmp_path / "shape.safetensors", {"t": e}, b"\0" * 8)
    assert_refused(cli, path, rule)


@pytest.mark.parametrize(
    "shape",
    [[2**40, 2**40], [2**64], [2**64, 0], [2**62, 8], [10**4000] * 3, [2**63] * 5000],
    ids=["2^80", "2^64", "2^64x0", "2^65-bytes", "huge-digits", "many-huge"],
)
def test_overflowing_shape_is_refused_without_computing_it(tmp_path, cli, shape):
    e = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    path = craft(tmp_path / "overflow.safetensors", {"t": e})
    assert_refused(cli, path, "overflows the byte size")


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], [-4, 4], [8, 0], [0.0, 8.0], "0-8", None, [0, 2**64 + 7]])
def test_bad_data_offsets(tmp_path, cli, offsets):
    e = entry()
    e["data_offsets"] = offsets
    path = craft(tmp_path / "offsets.safetensors", {"t": e}, b"\0" * 8)
    assert_refused(cli, path, "data_offsets")


@pytest.mark.parametrize("e, rule", [([1, 2], "is not an object"), ({"dtype": "F32"}, "lacks shape, data_offsets")])
def test_malformed_entry(tmp_path, cli, e, rule):
    path = craft(tmp_path / "entry.safetensors", {"t": e})
    assert_refused(cli, path, rule)


def test_size_mismatch(tmp_path, cli):
    path = craft(tmp_path / "size.safetensors", {"t": entry("F32", (3,), 0, 8)}, b"\0" * 8)
    assert_refused(cli, path, "data_offsets span 8 bytes but shape [3] x F32 needs 12")


def test_hole(tmp_path, cli):
    header = {"a": entry("F32", (1,), 0), "b": entry("F32", (1,), 8)}
    path = craft(tmp_path / "hole.safetensors", header, b"\0" * 12)
    assert_refused(cli, path, "leave a hole at byte 4")


def test_hole_at_the_start(tmp_path, cli):
    path = craft(tmp_path / "hole0.safetensors", {"a": entry("F32", (1,), 4)}, b"\0" * 8)
    assert_refused(cli, path, "leave a hole at byte 0")


def test_overlap(tmp_path, cli):
    header = {"a": entry("F32", (2,), 0), "b": entry("F32", (2,), 4)}
    path = craft(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    assert_refused(cli, path, "leave an overlap at byte 4")


def test_trailing_bytes(tmp_path, cli):
    path = craft(tmp_path / "trailing.safetensors", {"a": entry("F32", (2,))}, b"\0" * 8 + b"junk")
    assert_refused(cli, path, "4 trailing bytes after the last tensor")


@pytest.mark.parametrize("cut", [1, 7])
def test_truncated_data(tmp_path, cli, cut):
    path = craft(tmp_path / "trunc.safetensors", {"a": entry("F32", (2,))}, b"\0" * (8 - cut))
    assert_refused(cli, path, "truncated")


def test_truncated_after_a_real_writer(tmp_path, cli):
    good = tmp_path / "good.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(good))
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:-5])
    assert_refused(cli, path, "truncated")


@pytest.mark.parametrize(
    "metadata",
    [{"k": 1}, {"k": None}, {"k": ["a"]}, {"k": {"nested": "x"}}, ["k", "v"], "k=v", {"k": True}],
)
def test_non_string_metadata(tmp_path, cli, metadata):
    path = craft(tmp_path / "meta.safetensors", {"__metadata__": metadata})
    assert_refused(cli, path, "__metadata__ must map strings to strings")


@pytest.mark.parametrize("where", ["name", "metadata key", "metadata value"])
def test_lone_surrogate_escapes_are_refused(tmp_path, cli, where):
    text = {
        "name": b'{"bad\\udc80name": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        "metadata key": b'{"__metadata__": {"\\ud800": "x"}}',
        "metadata value": b'{"__metadata__": {"x": "\\udfff"}}',
    }[where]
    path = craft(tmp_path / "surrogate.safetensors", None, raw_header=text, data=b"\0" if where == "name" else b"")
    assert_refused(cli, path, "not valid Unicode")


def test_refusal_in_a_real_process_has_no_traceback(tmp_path):
    path = craft(tmp_path / "absurd.safetensors", {}, prefix=2**63)
    r = run_module("convert", path, "-o", tmp_path / "out.safetensors")
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {path}: invalid safetensors header")
    assert not (tmp_path / "out.safetensors").exists()


def test_json_error_object_for_a_refusal(tmp_path, cli):
    path = craft(tmp_path / "trunc.safetensors", {"a": entry("F32", (4,))}, b"\0" * 4)
    code, stdout, _ = cli("inspect", path, "--json")
    err = json.loads(stdout)["error"]
    assert code == 3 and err["exit_code"] == 3 and err["kind"] == "input" and "truncated" in err["message"]


# --- accepted as valid ---------------------------------------------------------------------


def round_trip(cli, path, tmp_path):
    code, stdout, stderr = cli("inspect", path, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    out = tmp_path / "copy.safetensors"
    code, _, stderr = cli("convert", path, "-o", out)
    assert code == 0, stderr
    return report, wsurgery.load_state_dict(out)


def test_empty_checkpoint_is_valid(tmp_path, cli):
    path = craft(tmp_path / "empty.safetensors", {})
    report, sd = round_trip(cli, path, tmp_path)
    assert report["tensors"] == [] and report["total_params"] == 0 and sd == {}


def test_zero_size_tensors_and_scalars_are_valid(tmp_path, cli):
    path = tmp_path / "corner.safetensors"
    save_file(
        {
            "empty": np.zeros((0,), np.float32),
            "empty2d": np.zeros((3, 0), np.int64),
            "scalar": np.array(2.5, np.float32),
            "bool_scalar": np.array(True),
            "after": np.arange(3, dtype=np.float16),
        },
        str(path),
    )
    report, sd = round_trip(cli, path, tmp_path)
    shapes = {t["name"]: t["shape"] for t in report["tensors"]}
    assert shapes == {"empty": [0], "empty2d": [3, 0], "scalar": [], "bool_scalar": [], "after": [3]}
    assert sd["scalar"].item() == 2.5 and sd["bool_scalar"].item() is True and sd["empty2d"].shape == (3, 0)


def test_hand_laid_zero_size_tensors_between_others(tmp_path, cli):
    header = {
        "a": entry("F32", (1,), 0),
        "z1": entry("F32", (0,), 4),
        "z2": entry("U8", (0, 5), 4),
        "b": entry("F32", (1,), 4),
    }
    path = craft(tmp_path / "zeros.safetensors", header, struct.pack("<ff", 1.0, 2.0))
    _, sd = round_trip(cli, path, tmp_path)
    assert sd["a"].item() == 1.0 and sd["b"].item() == 2.0 and sd["z2"].shape == (0, 5)


def test_metadata_only_file_is_valid(tmp_path, cli):
    path = craft(tmp_path / "meta.safetensors", {"__metadata__": {"format": "pt", "note": "no tensors"}})
    report, sd = round_trip(cli, path, tmp_path)
    assert report["metadata"]["note"] == "no tensors" and sd == {}


def test_null_metadata_and_padded_header_are_valid(tmp_path, cli):
    path = craft(tmp_path / "pad.safetensors", None, raw_header=b'{"__metadata__": null}      ')
    report, _ = round_trip(cli, path, tmp_path)
    assert report["tensors"] == []


# --- alias metadata ----------------------------------------------------------------------------


def with_aliases(tmp_path, aliases, extra_meta=None, name="aliased.safetensors"):
    header = {
        "__metadata__": {
            "format": "pt",
            "wsurgery.aliases": aliases if isinstance(aliases, str) else json.dumps(aliases),
            **(extra_meta or {}),
        },
        "w": entry("F32", (2, 3), 0),
        "v": entry("F32", (6,), 24),
    }
    return craft(tmp_path / name, header, b"\0" * 48)


@pytest.mark.parametrize(
    "aliases, rule",
    [
        ("{not json", "wsurgery.aliases metadata is not valid JSON"),
        ("[1, 2]", "wsurgery.aliases metadata is not a JSON object"),
        ({"a": "w"}, "entry 'a' must be"),
        ({"a": {"source": 3}}, "entry 'a' must be"),
        ({"a": {"source": "w", "transform": "transpose"}}, "entry 'a' must be"),
        ({"a": {"source": "w", "transform": [1]}}, "entry 'a' must be"),
        ({"a": {"source": "nowhere", "transform": []}}, "names a missing source 'nowhere'"),
        ({"a": {"source": "b", "transform": []}, "b": {"source": "a", "transform": []}}, "aliases form a cycle"),
        ({"a": {"source": "a", "transform": []}}, "aliases form a cycle"),
        ({"a": {"source": "w", "transform": ["twist"]}}, "alias 'a' has a bad transform"),
        ({"a": {"source": "v", "transform": ["transpose"]}}, "alias 'a' has a bad transform"),
        ({"a": {"source": "w", "transform": ["reshape(4,4)"]}}, "alias 'a' has a bad transform"),
        ({"a": {"source": "w", "transform": ["slice(0,0,9)"]}}, "alias 'a' has a bad transform"),
        ({"a": {"source": "w", "transform": ["reshape(" + "9" * 5000 + ")"]}}, "alias 'a' has a bad transform"),
        ({"a": {"source": "w", "transform": ["cast(float16)"]}}, "a tie takes view steps only"),
        ({"w": {"source": "v", "transform": ["reshape(2,3)"]}}, "is both a stored tensor and an alias"),
    ],
    ids=lambda x: x if isinstance(x, str) and len(x) < 40 else None,
)
def test_bad_alias_metadata_is_an_input_error(tmp_path, cli, aliases, rule):
    path = with_aliases(tmp_path, aliases)
    assert_refused(cli, path, rule)


def test_a_long_alias_chain_is_refused_quickly(tmp_path, cli):
    n = 20_000  # resolving each alias by walking the whole chain would take ~n^2 steps
    chain = {f"a{i}": {"source": f"a{i + 1}", "transform": []} for i in range(n)}
    chain[f"a{n}"] = {"source": "w", "transform": []}
    path = with_aliases(tmp_path, chain)
    assert_refused(cli, path, "chain of more than 64 aliases")


def test_short_alias_chains_compose(tmp_path):
    chain = {"a": {"source": "b", "transform": ["transpose"]}, "b": {"source": "w", "transform": []}}
    c = wsurgery.load(with_aliases(tmp_path, chain))
    assert c.aliases["a"].source == "w" and c.aliases["a"].shape == (3, 2)


def test_save_model_convention_naming_a_missing_tensor_is_plain_metadata(tmp_path):
    path = with_aliases(tmp_path, {}, extra_meta={"tied": "missing-tensor"})
    c = wsurgery.load(path)
    assert not c.aliases and c.metadata["tied"] == "missing-tensor"


# --- sharded folders ---------------------------------------------------------------------------


def sharded(tmp_path, weight_map=None, *, index_text=None):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    save_file({"a": np.ones(2, np.float32), "b": np.zeros(3, np.float32)}, str(folder / "s1.safetensors"))
    save_file({"c": np.full(4, 2, np.int64)}, str(folder / "s2.safetensors"))
    wm = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"} if weight_map is None else weight_map
    text = index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": wm})
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


def test_valid_sharded_folder_loads(tmp_path):
    c = wsurgery.load(sharded(tmp_path))
    assert c.names() == ["a", "b", "c"]


@pytest.mark.parametrize(
    "weight_map, rule",
    [
        (
            {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s3.safetensors"},
            "'s3.safetensors' named in weight_map does not exist",
        ),
        (
            {"a": "s2.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"},
            "puts 'a' in 's2.safetensors' but it is in 's1.safetensors'",
        ),
        ({"a": "s1.safetensors", "c": "s2.safetensors"}, "holds 'b', which weight_map does not list"),
        (
            {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors", "d": "s2.safetensors"},
            "puts 'd' in 's2.safetensors' but no shard holds it",
        ),
        ({"a": "../s1.safetensors"}, "leaves the checkpoint's folder"),
        ({"a": "/etc/passwd"}, "leaves the checkpoint's folder"),
        ({"a": "sub/../../x.safetensors"}, "leaves the checkpoint's folder"),
        ({"a": ""}, "weight_map must map tensor names to shard file names"),
        ({"a": 3}, "weight_map must map tensor names to shard file names"),
    ],
    ids=["missing", "wrong-shard", "unlisted", "listed-nowhere", "dotdot", "absolute", "nested-dotdot", "empty", "int"],
)
def test_bad_sharded_index(tmp_path, cli, weight_map, rule):
    assert_refused(cli, sharded(tmp_path, weight_map), rule)


def test_tensor_in_two_shards(tmp_path, cli):
    folder = sharded(tmp_path)
    save_file({"a": np.ones(2, np.float32), "c": np.full(4, 2, np.int64)}, str(folder / "s2.safetensors"))
    assert_refused(cli, folder, "tensor 'a' is stored in two shards")


def test_symlinked_shard_escaping_the_folder(tmp_path, cli):
    folder = sharded(tmp_path)
    outside = tmp_path / "outside.safetensors"
    (folder / "s2.safetensors").rename(outside)
    (folder / "s2.safetensors").symlink_to(outside)
    assert_refused(cli, folder, "leaves the checkpoint's folder")


@pytest.mark.parametrize(
    "text, rule",
    [
        ("{not json", "not UTF-8 JSON"),
        ('{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}', "key 'a' appears twice"),
        ('{"weight_map": ["a"]}', 'no "weight_map" object'),
        ('{"metadata": [], "weight_map": {}}', '"metadata" is not an object'),
        (
            '{"metadata": {"wsurgery.aliases": 5}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", '
            '"c": "s2.safetensors"}}',
            "must be a JSON string",
        ),
    ],
)
def test_malformed_index(tmp_path, cli, text, rule):
    assert_refused(cli, sharded(tmp_path, index_text=text) / "model.safetensors.index.json", rule)


def test_a_shard_that_is_not_safetensors(tmp_path, cli):
    folder = sharded(tmp_path)
    (folder / "s2.safetensors").write_bytes(b"\xff" * 64)
    assert_refused(cli, folder, "s2.safetensors")


def test_two_spellings_of_one_shard_are_one_shard(tmp_path):
    wm = {"a": "s1.safetensors", "b": "./s1.safetensors", "c": "s2.safetensors"}
    c = wsurgery.load(sharded(tmp_path, wm))
    assert c.names() == ["a", "b", "c"]


# --- not a file ------------------------------------------------------------------------------------


def test_a_fifo_is_refused_without_blocking(tmp_path, cli):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code, _, stderr = cli("inspect", fifo)
    assert code == 3 and "not a regular file" in stderr


def test_input_error_types(tmp_path):
    path = craft(tmp_path / "x.safetensors", {}, prefix=2**63)
    with pytest.raises(HeaderError):
        wsurgery.load(path)
    with pytest.raises(InputError):
        wsurgery.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("n", [0x80, 0x280, 0x380, 0x480, 0x580])
def test_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path, cli, n):
    """A header of 128 + 256k bytes makes the file's first byte 0x80, a pickle's PROTO opcode."""
    text = json.dumps({"w": entry("F32", (2,))}).encode()
    path = craft(tmp_path / "p.bin", None, raw_header=text + b" " * (n - len(text)), data=b"\0" * 8)
    assert path.read_bytes()[0] == 0x80
    code, stdout, stderr = cli("inspect", path, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["format"] == "safetensors"


def test_a_tensor_named_like_the_metadata_key_is_refused_on_write(tmp_path, cli):
    import torch

    path = tmp_path / "meta.pt"
    torch.save({"__metadata__": torch.ones(2), "x": torch.zeros(1)}, path)
    code, _, stderr = cli("convert", path, "-o", tmp_path / "out.safetensors")
    assert code == 5 and "reserves that key" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()
