"""The numpy path of computed copies (wsurgery.numpy_apply): the same bytes as torch.

The invariant: what wsurgery writes never depends on whether torch computed it. Each
supported (step, dtype) and a few chains are run both ways on seeded data full of special
values; unsupported steps must be dispatched to torch; a result holding a NaN (whose bits
torch sets kernel by kernel) is recomputed with torch; and `wsurgery copy` on a
safetensors file never imports torch for the supported steps.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import wsurgery
import wsurgery.io.torch_format
from wsurgery import numpy_apply
from wsurgery.errors import TransformError
from wsurgery.expressions import ComputedStored
from wsurgery.io.safetensors import FileStored
from wsurgery.io.sinks import FileSink
from wsurgery.model import tensor_bytes
from wsurgery.transforms import parse

ROOT = Path(__file__).resolve().parents[2]
FLOATS = ("float16", "bfloat16", "float32", "float64")
BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


# ----------------------------------------------------------------------------- factories


def np_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def nan_bits(name: str) -> list[int]:
    """NaNs of both signs, quiet and signalling, with the smallest and largest payloads."""
    exp_bits, man_bits = {"float16": (5, 10), "bfloat16": (8, 7), "float32": (8, 23), "float64": (11, 52)}[name]
    width = 1 + exp_bits + man_bits
    exp = ((1 << exp_bits) - 1) << man_bits
    quiet = 1 << (man_bits - 1)
    out = []
    for sign in (0, 1 << (width - 1)):
        for man in (quiet, quiet | 1, 1, quiet - 1, (1 << man_bits) - 1, quiet | (quiet >> 1)):
            out.append(sign | exp | man)
    return out


# Values that sit on the edges of the four float formats (overflow, subnormal ranges).
EDGES = [
    0.0, -0.0, np.inf, -np.inf, 1.0, -1.0,
    65504.0, 65519.99, 65520.0, -65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 1e-8,  # float16
    3.3895314e38, 3.3961e38, 3.4e38, 9.18e-41, 1e-39,  # bfloat16
    3.4028235e38, 3.4028236e38, 3.5e38, 1.1754944e-38, 1.4e-45, 7e-46, 1e-45,  # float32
    1.7976931348623157e308, 2.2250738585072014e-308, 5e-324,  # float64
]  # fmt: skip


def isnan(arr: np.ndarray) -> np.ndarray:
    """Elementwise NaN test on the bits (ml_dtypes warns when casting a NaN)."""
    size = arr.dtype.itemsize
    inf = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000, "float64": 0x7FF0000000000000}
    u = np.ascontiguousarray(arr).view(BITS[size])
    return (u & BITS[size]((1 << (8 * size - 1)) - 1)) > inf[str(arr.dtype)]


def factory(name: str, *, nans: bool = True, seed: int = 0, n: int = 200_000) -> np.ndarray:
    """A seeded 1-D array of dtype ``name``: every bit pattern for the 16-bit types; for
    float32/float64 random bit patterns (subnormals, payload NaNs), random magnitudes over
    the whole range, the format edges above and NaNs with payloads and signs. ``nans=False``
    drops every NaN. The length is padded to a multiple of 64 with the first values."""
    dt = np_dtype(name)
    bits = BITS[dt.itemsize]
    if dt.itemsize == 2:
        arr = np.arange(1 << 16, dtype=np.uint32).astype(bits).view(dt)
    else:
        rng = np.random.default_rng(seed)
        raw = rng.integers(0, np.iinfo(bits).max, n, dtype=bits, endpoint=True).view(dt)
        top = 38 if name == "float32" else 300
        mags = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-top - 10, top + 1, n)
        near = rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)  # ties and half-ways after scaling
        with np.errstate(all="ignore"):
            extra = np.concatenate([mags, near, np.array(EDGES)]).astype(dt)
        arr = np.concatenate([raw, extra, np.array(nan_bits(name), dtype=bits).view(dt)])
    if not nans:
        arr = arr[~isnan(arr)]
    return np.concatenate([arr, arr[: -arr.size % 64]])


def to_torch(arr: np.ndarray) -> torch.Tensor:
    signed = SIGNED[arr.dtype.itemsize]
    name = "bool" if arr.dtype == np.bool_ else str(arr.dtype)
    return torch.from_numpy(contiguous(arr).view(signed).copy()).view(getattr(torch, name))


def torch_bytes(specs, arr: np.ndarray) -> bytes:
    """The torch path: what ``ComputedStored._compute`` writes."""
    out = parse(specs).apply(to_torch(arr), allow_copy=True).contiguous()
    return bytes(tensor_bytes(out))


def contiguous(arr: np.ndarray) -> np.ndarray:
    return arr if arr.flags.c_contiguous else arr.copy()  # np.ascontiguousarray makes 0-d 1-d


def numpy_result(specs, arr: np.ndarray, name: str) -> np.ndarray:
    return contiguous(numpy_apply.apply(parse(specs), arr, name))


def assert_same_except_nan_bits(got: np.ndarray, ref: bytes) -> None:
    """Equal bits everywhere but at NaNs, which must be NaNs on both sides."""
    bits = BITS[got.dtype.itemsize]
    a = got.reshape(-1).view(bits)
    b = np.frombuffer(ref, dtype=bits)
    nan_a = isnan(got.reshape(-1))
    nan_b = isnan(np.frombuffer(ref, dtype=got.dtype))
    assert np.array_equal(nan_a, nan_b)
    assert np.array_equal(a[~nan_a], b[~nan_b])


# Factors that are 0 or inf in float32 (1e-50, 1e39) make NaNs of 0 and inf: see below.
FACTORS = [0.5, 2.0, 3.0, -7.3, 0.1, 1 / 3, 1e-3, 1e30, 1e-30, 65504.0, 1e-40, 3e38, -1.0, 1.0]
CASTS = [(a, b) for a in FLOATS for b in FLOATS if (a, b) not in (("float64", "float16"), ("float64", "bfloat16"))]


# ----------------------------------------------------------------------------- parity, step by step


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("factor", FACTORS)
def test_scale_matches_torch_bit_for_bit(name, factor):
    arr = factory(name, nans=False)
    specs = [f"scale({factor!r})"]
    assert numpy_apply.supports(parse(specs), name)
    got = numpy_result(specs, arr, name)
    assert got.dtype == np_dtype(name)
    assert not numpy_apply.has_nan(got)
    assert got.tobytes() == torch_bytes(specs, arr)


@pytest.mark.parametrize(("src", "dst"), CASTS, ids=lambda v: v)
def test_cast_matches_torch_bit_for_bit(src, dst):
    arr = factory(src, nans=False)
    specs = [f"cast({dst})"]
    assert numpy_apply.supports(parse(specs), src)
    assert numpy_apply.needs_nan_check(parse(specs), src) == (src != dst)
    got = numpy_result(specs, arr, src)
    assert got.dtype == np_dtype(dst)
    assert got.tobytes() == torch_bytes(specs, arr)


CHAINS = [
    ["transpose", "cast(float16)", "scale(2)"],
    ["transpose", "cast(bfloat16)"],
    ["slice(1,3,-5)", "scale(-0.25)", "cast(bfloat16)", "scale(3)"],
    ["cast(bfloat16)", "transpose", "scale(1e-3)", "cast(float32)", "scale(7)"],
    ["reshape(-1,16)", "transpose", "reshape(-1)", "scale(0.5)", "cast(float64)"],
    ["reshape(8,-1,4)", "permute(2,0,1)", "cast(float16)", "cast(bfloat16)", "slice(-1,1)"],
    ["transpose(0,1)", "reshape(-1,32)", "cast(float32)", "cast(float32)", "scale(1e30)", "cast(float16)"],
    ["scale(0.5)", "scale(3)", "transpose(-1,-2)"],
]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("specs", CHAINS, ids=" -> ".join)
def test_chains_match_torch_bit_for_bit(name, specs):
    arr = factory(name, nans=False).reshape(-1, 64)
    if not numpy_apply.supports(parse(specs), name):  # float64 -> float16 / bfloat16 somewhere
        assert name == "float64"
        return
    got = numpy_result(specs, arr, name)
    assert got.tobytes() == torch_bytes(specs, arr)


VIEW_CHAINS = [
    ["transpose"],
    ["transpose(0,-1)", "reshape(-1)"],
    ["reshape(4,-1,8)", "permute(1,2,0)", "slice(0,-7)"],
    ["slice(0,2,9)", "slice(1,-40,60)", "transpose", "reshape(4,-1)"],
    ["slice(1,5,5)"],
]
ANY_DTYPES = [
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool", "complex64",
]  # fmt: skip


@pytest.mark.parametrize("name", ANY_DTYPES)
@pytest.mark.parametrize("specs", VIEW_CHAINS, ids=" -> ".join)
def test_view_chains_move_bits_of_any_dtype(name, specs):
    """Views only move elements: NaN payloads included, any dtype, no NaN check."""
    dt = np_dtype(name)
    raw = np.random.default_rng(1).integers(0, 256, 64 * 64 * dt.itemsize, dtype=np.uint8)
    if name == "bool":
        raw &= 1
    arr = raw.view(dt).reshape(64, 64)
    t = parse(specs)
    assert numpy_apply.supports(t, name) and not numpy_apply.needs_nan_check(t, name)
    assert numpy_result(specs, arr, name).tobytes() == torch_bytes(specs, arr)


@pytest.mark.parametrize(
    ("specs", "shape"),
    [
        (["transpose(0,0)"], ()),
        (["transpose(-1,0)", "scale(2)"], ()),
        (["permute()", "cast(float16)"], ()),
        (["reshape(-1)", "scale(3)"], ()),
        (["transpose", "scale(2)"], (0, 5)),
        (["slice(0,2,2)", "cast(bfloat16)"], (4, 3)),
        (["reshape(3,0)", "scale(2)"], (0, 3)),
    ],
)
def test_zero_d_and_empty_tensors(specs, shape):
    arr = np.arange(max(1, int(np.prod(shape))), dtype=np.float32)[: int(np.prod(shape))].reshape(shape)
    got = numpy_result(specs, arr, "float32")
    assert got.tobytes() == torch_bytes(specs, arr)
    assert got.shape == tuple(parse(specs).infer(shape, "float32")[0])


# ----------------------------------------------------------------------------- NaN


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("specs", [["scale(0.5)"], ["cast(float32)"], ["cast(bfloat16)"], ["cast(float16)"]])
def test_nan_results_are_flagged_and_values_agree(name, specs):
    """torch's NaN bits depend on its kernel (e.g. float32 -> bfloat16 gives 0xFFFF from
    the AVX2 kernel, 0x7FC0 from the scalar one); every other bit agrees, and a result
    with a NaN is flagged so that the writer recomputes it with torch."""
    t = parse(specs)
    if not numpy_apply.supports(t, name):
        return
    arr = factory(name)
    got = numpy_result(specs, arr, name)
    assert_same_except_nan_bits(got, torch_bytes(specs, arr))
    if numpy_apply.needs_nan_check(t, name):
        assert numpy_apply.has_nan(got)


@pytest.mark.parametrize("name", FLOATS)
def test_has_nan(name):
    dt = np_dtype(name)
    clean = factory(name, nans=False)
    assert not numpy_apply.has_nan(clean)
    assert not numpy_apply.has_nan(clean[:0])
    for bits in nan_bits(name):
        for where in (0, 70_000, clean.size - 1):
            dirty = clean.copy()
            dirty.view(BITS[dt.itemsize])[min(where, clean.size - 1)] = bits
            assert numpy_apply.has_nan(dirty)
            assert numpy_apply.has_nan(dirty[::-1].reshape(-1, 64))  # non-contiguous


# ----------------------------------------------------------------------------- dispatch


UNSUPPORTED = [
    ("float64", ["cast(float16)"]),
    ("float64", ["cast(bfloat16)"]),
    ("float64", ["transpose", "scale(2)", "cast(bfloat16)"]),
    ("float32", ["cast(float64)", "cast(float16)"]),
    ("float32", ["cast(int32)"]),
    ("float32", ["cast(bool)"]),
    ("float32", ["cast(complex64)"]),
    ("float32", ["cast(float8_e4m3fn)"]),
    ("float16", ["cast(float8_e5m2)"]),
    ("bfloat16", ["cast(uint8)"]),
    ("float8_e4m3fn", ["cast(float32)"]),
    ("float8_e5m2", ["scale(2)"]),
    ("int32", ["scale(3)"]),
    ("uint8", ["scale(2)"]),
    ("int64", ["cast(float32)"]),
    ("int8", ["cast(int16)"]),
    ("bool", ["cast(float32)"]),
    ("complex64", ["scale(0.5)"]),
    ("float32", ["cast(int16)", "cast(float32)"]),
]


@pytest.mark.parametrize(("name", "specs"), UNSUPPORTED, ids=lambda v: str(v))
def test_unsupported_steps_are_refused(name, specs):
    t = parse(specs)
    assert not numpy_apply.supports(t, name)
    dt = np_dtype(name)
    arr = np.zeros((4, 4), dtype=dt)
    with pytest.raises(TransformError, match="not a step numpy computes like torch"):
        numpy_apply.apply(t, arr, name)


def test_views_only_refuses_compute_steps():
    with pytest.raises(TransformError, match="step 2 'scale\\(2.0\\)': not a view step"):
        numpy_apply.apply(parse(["transpose", "scale(2)"]), np.zeros((2, 3), np.float32), "float32", views_only=True)
    with pytest.raises(TransformError, match="step 1 'transpose'"):  # the step's own check
        numpy_apply.apply(parse(["transpose"]), np.zeros((2, 3, 4), np.float32), "float32")


def test_identity_cast_is_supported_for_every_dtype():
    for name in ANY_DTYPES:
        t = parse([f"cast({name})", "transpose"])
        assert numpy_apply.supports(t, name) and not numpy_apply.needs_nan_check(t, name)


def safetensors_of(path: Path, **arrays: np.ndarray) -> Path:
    save_file({k: to_torch(v) for k, v in arrays.items()}, str(path))
    return path


class Spy:
    """Counts the torch computations of ``ComputedStored``."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ComputedStored._compute

        def spy(stored, own=False):
            self.calls += 1
            return real(stored, own)

        monkeypatch.setattr(ComputedStored, "_compute", spy)


def written(stored: ComputedStored) -> bytes:
    buf = io.BytesIO()
    stored.write(FileSink(buf))
    return buf.getvalue()


def both_paths(monkeypatch, stored: ComputedStored) -> tuple[bytes, bytes]:
    """(what write() gives, what the torch path gives)."""
    first = written(stored)
    with monkeypatch.context() as m:
        m.setattr(ComputedStored, "_use_numpy", lambda self: False)
        ref = written(stored)
    return first, ref


@pytest.mark.parametrize(
    ("name", "specs"),
    [("float32", ["scale(0.5)"]), ("bfloat16", ["transpose", "scale(3)"]), ("float16", ["cast(bfloat16)"])]
    + [(n, ["slice(0,1)", *s]) for n, s in UNSUPPORTED],
    ids=lambda v: str(v),
)
def test_computed_stored_dispatch(monkeypatch, tmp_path, name, specs):
    """Supported chains compute with numpy, the others with torch; the bytes are torch's."""
    raw = factory(name, nans=False) if name in FLOATS else np.arange(-512, 512).astype(np_dtype(name))
    arr = raw[: raw.size // 64 * 64].reshape(-1, 64)
    ck = wsurgery.load(safetensors_of(tmp_path / "a.safetensors", x=arr))
    try:
        stored = ComputedStored("y", ck.stored["x"], parse(specs))
        supported = numpy_apply.supports(stored.transform, name)
        assert stored._use_numpy() == supported
        spy = Spy(monkeypatch)
        got, ref = both_paths(monkeypatch, stored)
        assert spy.calls == (1 if supported else 2)
        assert got == ref
        assert got == torch_bytes(specs, arr)
    finally:
        ck.close()


NAN_RESULTS = [
    ("float32", ["scale(0.5)"], True),
    ("float64", ["scale(0.5)"], True),
    ("float16", ["scale(0.5)"], True),
    ("bfloat16", ["transpose", "scale(0.5)"], True),
    ("float32", ["transpose", "cast(bfloat16)"], True),
    ("float16", ["cast(float32)"], True),
    ("float32", ["cast(float16)"], True),
    ("bfloat16", ["cast(float16)", "slice(0,1)"], True),
    ("float64", ["cast(float32)", "scale(0)"], False),  # inf * 0
    ("float32", ["scale(-0.0)"], False),
    ("float32", ["scale(1e-50)"], False),  # the factor is 0 in float32
    ("bfloat16", ["scale(1e39)"], False),  # the factor is inf in float32: 0 * inf
    ("float32", ["scale(1e39)"], False),
]


@pytest.mark.parametrize(("name", "specs", "nans"), NAN_RESULTS, ids=lambda v: str(v))
def test_a_nan_result_is_recomputed_with_torch(monkeypatch, tmp_path, name, specs, nans):
    """NaN inputs, inf * 0 and 0 * (a factor that is inf in float32): torch writes them."""
    t = parse(specs)
    arr = factory(name, nans=nans).reshape(-1, 64)
    ck = wsurgery.load(safetensors_of(tmp_path / "a.safetensors", x=arr))
    try:
        stored = ComputedStored("y", ck.stored["x"], t)
        assert stored._use_numpy()
        spy = Spy(monkeypatch)
        got, ref = both_paths(monkeypatch, stored)
        assert spy.calls == 2  # the numpy result held a NaN: torch computed it
        assert got == ref == torch_bytes(specs, arr)
    finally:
        ck.close()


def test_a_view_chain_keeps_nan_bits_without_torch(monkeypatch, tmp_path):
    arr = factory("bfloat16").reshape(-1, 64)
    ck = wsurgery.load(safetensors_of(tmp_path / "a.safetensors", x=arr))
    try:
        stored = ComputedStored("y", ck.stored["x"], parse(["transpose", "cast(bfloat16)", "slice(0,3)"]))
        spy = Spy(monkeypatch)
        got, ref = both_paths(monkeypatch, stored)
        assert spy.calls == 1 and got == ref
    finally:
        ck.close()


def test_torch_inputs_and_other_devices_use_torch(monkeypatch, tmp_path):
    arr = factory("float32", nans=False).reshape(-1, 64)
    ck = wsurgery.load(safetensors_of(tmp_path / "a.safetensors", x=arr))
    try:
        base = ck.stored["x"]
        assert isinstance(base, FileStored)
        assert ComputedStored("y", base, parse("scale(2)"), device="cpu")._use_numpy()
        assert ComputedStored("y", base, parse("scale(2)"), device=torch.device("cpu"))._use_numpy()
        assert not ComputedStored("y", base, parse("scale(2)"), device="cuda")._use_numpy()
        assert not ComputedStored("y", base, parse("scale(2)"), device="cuda:0")._use_numpy()
        in_memory = wsurgery.io.torch_format.from_tensors({"x": to_torch(arr)}).stored["x"]
        stored = ComputedStored("y", in_memory, parse("scale(2)"))
        assert not stored._use_numpy()
        spy = Spy(monkeypatch)
        assert written(stored) == torch_bytes(["scale(2)"], arr)
        assert spy.calls == 1
    finally:
        ck.close()


# ----------------------------------------------------------------------------- end to end


COPIES = [
    ("float32", ["scale(0.5)"]),
    ("bfloat16", ["scale(0.5)"]),
    ("float32", ["cast(float16)"]),
    ("float32", ["transpose", "cast(bfloat16)"]),
    ("float16", ["transpose", "cast(bfloat16)"]),
]


def copy_args(path: Path, out: Path, specs) -> list[str]:
    return ["copy", str(path), "--src", "a", "--dst", "c", *sum((["-t", s] for s in specs), []), "-o", str(out)]


@pytest.mark.parametrize(("name", "specs"), COPIES, ids=lambda v: str(v))
def test_cli_copy_writes_the_torch_bytes(cli, monkeypatch, tmp_path, name, specs):
    arr = factory(name, nans=False)[: 96 * 64].reshape(96, 64)
    src = safetensors_of(tmp_path / "in.safetensors", a=arr, b=arr[::-1].copy())
    spy = Spy(monkeypatch)
    code, _, err = cli(*copy_args(src, tmp_path / "np.safetensors", specs))
    assert code == 0, err
    assert spy.calls == 0
    with monkeypatch.context() as m:
        m.setattr(ComputedStored, "_use_numpy", lambda self: False)
        code, _, err = cli(*copy_args(src, tmp_path / "torch.safetensors", specs))
    assert code == 0, err
    assert spy.calls == 1
    assert (tmp_path / "np.safetensors").read_bytes() == (tmp_path / "torch.safetensors").read_bytes()
    got = wsurgery.load_state_dict(tmp_path / "np.safetensors")
    assert got["c"].contiguous().view(torch.uint8).numpy().tobytes() == torch_bytes(specs, arr)


def test_cli_untie_of_a_safetensors_alias_writes_the_torch_bytes(cli, monkeypatch, tmp_path):
    w = to_torch(factory("bfloat16").reshape(-1, 64))  # NaN payloads too: views move bits
    src = tmp_path / "tied.safetensors"
    wsurgery.save_state_dict({"w": w, "t": w.t()}, src)
    spy = Spy(monkeypatch)
    code, _, err = cli("untie", src, "-o", tmp_path / "np.safetensors")
    assert code == 0, err
    with monkeypatch.context() as m:
        m.setattr(ComputedStored, "_use_numpy", lambda self: False)
        code, _, err = cli("untie", src, "-o", tmp_path / "torch.safetensors")
    assert code == 0, err
    assert spy.calls == 1
    assert (tmp_path / "np.safetensors").read_bytes() == (tmp_path / "torch.safetensors").read_bytes()


def test_cli_copy_of_safetensors_does_not_import_torch(tmp_path):
    arr32 = factory("float32", nans=False)[: 32 * 64].reshape(32, 64)
    f32 = safetensors_of(tmp_path / "f32.safetensors", a=arr32, b=arr32 + 1)
    bf16 = safetensors_of(tmp_path / "bf16.safetensors", a=arr32.astype(np_dtype("bfloat16")), b=np.zeros((1,)))
    jobs = [
        (f32, ["scale(0.5)"]),
        (f32, ["cast(float16)"]),
        (f32, ["transpose", "cast(bfloat16)"]),
        (bf16, ["scale(0.5)"]),
        (bf16, ["slice(0,1,9)", "cast(float32)", "scale(2)", "cast(float16)"]),
    ]
    runs = [copy_args(path, tmp_path / f"o{i}.safetensors", specs) for i, (path, specs) in enumerate(jobs)]
    code = (
        "import sys\n"
        "from wsurgery.cli.app import app\n"
        "for args in sys.argv[1:]:\n"
        "    try:\n"
        "        app(args.split('|'))\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok-no-torch', file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *("|".join(a) for a in runs)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert "ok-no-torch" in r.stderr
    for i, (path, specs) in enumerate(jobs):
        got = wsurgery.load_state_dict(tmp_path / f"o{i}.safetensors")["c"]
        source = arr32 if path == f32 else arr32.astype(np_dtype("bfloat16"))
        assert bytes(tensor_bytes(got)) == torch_bytes(specs, source)


def test_cli_copy_of_a_pt_file_uses_torch(cli, monkeypatch, tmp_path):
    arr = factory("float32", nans=False)[: 32 * 64].reshape(32, 64)
    src = tmp_path / "in.pt"
    torch.save({"a": to_torch(arr), "b": to_torch(arr)}, src)
    spy = Spy(monkeypatch)
    code, _, err = cli(*copy_args(src, tmp_path / "o.safetensors", ["scale(0.5)"]))
    assert code == 0, err
    assert spy.calls == 1
    got = wsurgery.load_state_dict(tmp_path / "o.safetensors")["c"]
    assert bytes(tensor_bytes(got)) == torch_bytes(["scale(0.5)"], arr)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_copy_on_cuda_uses_torch(cli, monkeypatch, tmp_path):
    arr = factory("float32", nans=False)[: 32 * 64].reshape(32, 64)
    src = safetensors_of(tmp_path / "in.safetensors", a=arr, b=arr)
    spy = Spy(monkeypatch)
    code, _, err = cli(*copy_args(src, tmp_path / "o.safetensors", ["scale(0.5)"]), "--device", "cuda")
    assert code == 0, err
    assert spy.calls == 1
