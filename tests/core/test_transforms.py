"""Tests for wsurgery.transforms: parsing, canonical specs, inference, application, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsurgery import transforms as T
from wsurgery.errors import SurgeryError, TransformError

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- factories


def make(shape, dtype=torch.float32, seed=0):
    """A seeded tensor of ``shape``; integer/bool dtypes get small random integers."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if not dtype.is_floating_point:
        return torch.randint(-100, 100, shape, generator=gen).to(dtype)
    return (torch.randn(shape, generator=gen) * 10).to(dtype)


def storage_ptr(t):
    return t.untyped_storage().data_ptr()


def shares_storage(a, b):
    return storage_ptr(a) == storage_ptr(b)


def bit_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(TransformError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- module


def test_import_parse_and_infer_do_not_import_torch():
    code = (
        "import wsurgery.transforms as t; "
        "t.parse(['transpose','cast(bf16)']).infer((2,3),'float32'); "
        "t.parse_step('scale(0.5)').infer((2,), 'bfloat16'); "
        "import sys; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO)})


def test_transform_error_is_a_surgery_error():
    assert issubclass(TransformError, SurgeryError)
    assert isinstance(TransformError("x"), SurgeryError)


# ----------------------------------------------------------------------------- parsing

PARSED = [
    ("same", T.Same()),
    ("  SAME ", T.Same()),
    ("Same()", T.Same()),
    ("transpose", T.Transpose()),
    ("TRANSPOSE", T.Transpose()),
    (" Transpose ( ) ", T.Transpose()),
    ("transpose(0,1)", T.Transpose((0, 1))),
    ("transpose( -1 , +0 )", T.Transpose((-1, 0))),
    ("PERMUTE(2, 0,1)", T.Permute((2, 0, 1))),
    ("permute()", T.Permute(())),
    ("reshape( 4096 , -1 )", T.Reshape((4096, -1))),
    ("Reshape()", T.Reshape(())),
    ("slice(0,1,3)", T.Slice(0, 1, 3)),
    ("slice(-1, -3)", T.Slice(-1, -3, None)),
    ("slice(1,2,)", T.Slice(1, 2, None)),
    ("slice(1, 2, None)", T.Slice(1, 2, None)),
    ("slice(0,,2)", T.Slice(0, 0, 2)),
    ("cast(bfloat16)", T.Cast("bfloat16")),
    ("CAST( BF16 )", T.Cast("bfloat16")),
    ("cast(torch.float16)", T.Cast("float16")),
    ("cast(F32)", T.Cast("float32")),
    ("cast(half)", T.Cast("float16")),
    ("cast(int8)", T.Cast("int8")),
    ("scale(0.5)", T.Scale(0.5)),
    ("Scale( -2 )", T.Scale(-2.0)),
    ("scale(1e-3)", T.Scale(0.001)),
]


@pytest.mark.parametrize(("text", "step"), PARSED)
def test_parse_step(text, step):
    assert T.parse_step(text) == step


CANONICAL = [
    ("SAME", "same"),
    (" transpose ", "transpose"),
    ("transpose( -1, +2 )", "transpose(-1,2)"),
    ("transpose(0,1)", "transpose(0,1)"),
    ("permute( 2 , 0 , 1 )", "permute(2,0,1)"),
    ("permute(-1,0)", "permute(-1,0)"),
    ("reshape(4096, -1)", "reshape(4096,-1)"),
    ("reshape(007)", "reshape(7)"),
    ("reshape()", "reshape()"),
    ("slice(0, 1, 3)", "slice(0,1,3)"),
    ("slice(-1,-3,)", "slice(-1,-3)"),
    ("slice(1,,4)", "slice(1,0,4)"),
    ("cast(bf16)", "cast(bfloat16)"),
    ("cast(torch.float16)", "cast(float16)"),
    ("cast(I8)", "cast(int8)"),
    ("scale(.5)", "scale(0.5)"),
    ("scale(2)", "scale(2.0)"),
    ("scale(1e-5)", "scale(1e-05)"),
    ("scale(0.1)", "scale(0.1)"),
    ("scale(-0.0)", "scale(-0.0)"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL)
def test_canonical_spec_round_trips(text, canonical):
    step = T.parse_step(text)
    assert step.spec() == canonical
    assert str(step) == canonical
    assert T.parse_step(canonical) == step
    assert T.parse_step(canonical).spec() == canonical


def test_is_view_flags():
    views = ["same", "transpose", "transpose(0,1)", "permute(1,0)", "reshape(-1)", "slice(0,1)"]
    for text in views:
        assert T.parse_step(text).is_view is True
    for text in ["cast(bf16)", "scale(0.5)"]:
        assert T.parse_step(text).is_view is False


def test_steps_are_frozen_and_hashable():
    step = T.parse_step("permute(1,0)")
    with pytest.raises(AttributeError):
        step.dims = (0, 1)
    assert len({T.parse_step("scale(0.5)"), T.Scale(0.5), T.parse_step("SCALE(5e-1)")}) == 1


# ----------------------------------------------------------------------------- inference

INFER = [
    ("same", (3, 4), "float32", (3, 4), "float32"),
    ("transpose", (3, 4), "float32", (4, 3), "float32"),
    ("transpose", (0, 4), "float16", (4, 0), "float16"),
    ("transpose(0,2)", (2, 3, 4), "int8", (4, 3, 2), "int8"),
    ("transpose(-1,-2)", (2, 3, 4), "float32", (2, 4, 3), "float32"),
    ("transpose(1,1)", (2, 3), "float32", (2, 3), "float32"),
    ("transpose(0,-1)", (), "float32", (), "float32"),
    ("permute(2,0,1)", (2, 3, 4), "float32", (4, 2, 3), "float32"),
    ("permute(-1,0,-2)", (2, 3, 4), "float32", (4, 2, 3), "float32"),
    ("permute()", (), "bfloat16", (), "bfloat16"),
    ("permute(0)", (5,), "float32", (5,), "float32"),
    ("reshape(4,-1)", (2, 3, 4), "float32", (4, 6), "float32"),
    ("reshape(-1)", (2, 3, 4), "float32", (24,), "float32"),
    ("reshape(24)", (2, 3, 4), "float32", (24,), "float32"),
    ("reshape(1,1)", (), "float32", (1, 1), "float32"),
    ("reshape()", (1, 1), "float32", (), "float32"),
    ("reshape(-1)", (), "float32", (1,), "float32"),
    ("reshape(-1)", (0, 3), "float32", (0,), "float32"),
    ("reshape(3,-1)", (0, 3), "float32", (3, 0), "float32"),
    ("reshape(3,0,2)", (0, 3), "float32", (3, 0, 2), "float32"),
    ("slice(0,1,3)", (4, 5), "float32", (2, 5), "float32"),
    ("slice(1,2)", (4, 5), "float32", (4, 3), "float32"),
    ("slice(-1,-2)", (4, 5), "float32", (4, 2), "float32"),
    ("slice(0,-3,-1)", (4, 5), "float32", (2, 5), "float32"),
    ("slice(0,2,2)", (4, 5), "float32", (0, 5), "float32"),
    ("slice(0,3,1)", (4, 5), "float32", (0, 5), "float32"),
    ("slice(0,4)", (4, 5), "float32", (0, 5), "float32"),
    ("slice(0,-4,4)", (4, 5), "float32", (4, 5), "float32"),
    ("slice(0,0)", (0, 5), "float32", (0, 5), "float32"),
    ("cast(bf16)", (4, 5), "float32", (4, 5), "bfloat16"),
    ("cast(int8)", (), "bfloat16", (), "int8"),
    ("scale(0.5)", (4, 5), "bfloat16", (4, 5), "bfloat16"),
    ("scale(3)", (4,), "int8", (4,), "int8"),
    ("scale(2)", (4,), "uint8", (4,), "uint8"),
]


@pytest.mark.parametrize(("spec", "shape", "dtype", "out_shape", "out_dtype"), INFER)
def test_step_infer(spec, shape, dtype, out_shape, out_dtype):
    assert T.parse_step(spec).infer(shape, dtype) == (out_shape, out_dtype)


@pytest.mark.parametrize(("spec", "shape", "dtype", "out_shape", "out_dtype"), INFER)
def test_infer_matches_apply(spec, shape, dtype, out_shape, out_dtype):
    x = make(shape, getattr(torch, dtype))
    out = T.parse_step(spec).apply(x, allow_copy=False)
    assert tuple(out.shape) == out_shape
    assert str(out.dtype) == f"torch.{out_dtype}"


def test_infer_accepts_dtype_aliases_torch_dtypes_and_sizes():
    step = T.parse_step("transpose")
    assert step.infer([2, 3], "bf16") == ((3, 2), "bfloat16")
    assert step.infer(torch.Size([2, 3]), torch.float16) == ((3, 2), "float16")
    assert T.parse("same").infer((2,), "F32") == ((2,), "float32")


# ----------------------------------------------------------------------------- application

APPLY = [
    ("same", (3, 4), lambda x: x),
    ("transpose", (3, 4), lambda x: x.t()),
    ("TRANSPOSE", (1, 7), lambda x: x.transpose(0, 1)),
    ("transpose(0,2)", (2, 3, 4), lambda x: x.transpose(0, 2)),
    ("transpose(-1,-2)", (2, 3, 4), lambda x: x.transpose(-1, -2)),
    ("permute(2,0,1)", (2, 3, 4), lambda x: x.permute(2, 0, 1)),
    ("permute(-1,0,1)", (2, 3, 4), lambda x: x.permute(2, 0, 1)),
    ("reshape(4,-1)", (2, 3, 4), lambda x: x.reshape(4, -1)),
    ("reshape(-1)", (2, 3, 4), lambda x: x.flatten()),
    ("reshape(6,2,2)", (2, 3, 4), lambda x: x.view(6, 2, 2)),
    ("slice(0,1,3)", (4, 5), lambda x: x[1:3]),
    ("slice(1,2)", (4, 5), lambda x: x[:, 2:]),
    ("slice(-1,-3,-1)", (4, 5), lambda x: x[:, -3:-1]),
    ("slice(1,4,2)", (4, 5), lambda x: x[:, 4:2]),
]


@pytest.mark.parametrize(("spec", "shape", "ref"), APPLY)
def test_view_step_apply_matches_torch_and_shares_storage(spec, shape, ref):
    x = make(shape, seed=1)
    step = T.parse_step(spec)
    out = step.apply(x)
    expected = ref(x)
    assert bit_equal(out, expected)
    assert out.stride() == expected.stride()
    assert shares_storage(out, x)
    # a live view: writes through the input show in the output
    x.add_(1)
    assert bit_equal(out, ref(x))


def test_same_returns_the_input_itself():
    x = make((2, 2))
    assert T.Same().apply(x) is x
    assert T.parse(["same", "SAME"]).apply(x) is x


CASTS = ["float32", "bfloat16", "float16", "int8"]


@pytest.mark.parametrize("src", CASTS)
@pytest.mark.parametrize("dst", CASTS)
def test_cast_matches_torch(src, dst):
    x = make((5, 6), getattr(torch, src), seed=2)
    out = T.parse_step(f"cast({dst})").apply(x)
    assert bit_equal(out, x.to(getattr(torch, dst)))
    assert not shares_storage(out, x)  # cast always returns a new tensor, same dtype too


def test_cast_to_other_dtypes():
    x = make((3, 3), seed=3)
    for name in ["float64", "float8_e4m3fn", "int64", "uint8", "bool", "complex64"]:
        out = T.parse_step(f"cast({name})").apply(x)
        assert bit_equal(out, x.to(getattr(torch, name)))


@pytest.mark.parametrize(
    ("dtype", "factor", "ref"),
    [
        (torch.float32, 0.5, lambda x, f: x * f),
        (torch.float64, 0.1, lambda x, f: x * f),
        (torch.bfloat16, 0.5, lambda x, f: (x.float() * f).bfloat16()),
        (torch.bfloat16, 0.1, lambda x, f: (x.float() * f).bfloat16()),
        (torch.bfloat16, -3.0, lambda x, f: (x.float() * f).bfloat16()),
        (torch.float16, 0.3, lambda x, f: (x.float() * f).half()),
        (torch.int8, 2.0, lambda x, f: x * 2),
        (torch.int8, -1.0, lambda x, f: x * -1),
        (torch.int64, 3.0, lambda x, f: x * 3),
        (torch.uint8, 2.0, lambda x, f: x * 2),
    ],
)
def test_scale_matches_reference(dtype, factor, ref):
    x = make((4, 7), dtype, seed=4)
    out = T.parse_step(f"scale({factor})").apply(x)
    assert bit_equal(out, ref(x, factor))
    assert not shares_storage(out, x)


def test_scale_bf16_rounds_once_from_float32():
    # 1.0 + 2**-8 is not representable in bf16; scaling in float32 then rounding back
    x = torch.tensor([3.0, 1.0, -7.0, 0.0], dtype=torch.bfloat16)
    out = T.parse_step("scale(0.3359375)").apply(x)
    assert bit_equal(out, (x.float() * 0.3359375).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_scale_float8_is_computed_in_float32():
    x = make((8,), seed=5).to(torch.float8_e4m3fn)
    out = T.parse_step("scale(0.5)").apply(x)
    assert out.dtype == torch.float8_e4m3fn
    assert torch.equal(out.float(), (x.float() * 0.5).to(torch.float8_e4m3fn).float())


def test_scalar_tensors():
    x = torch.tensor(2.5)
    assert bit_equal(T.parse_step("reshape(1,1)").apply(x), x.reshape(1, 1))
    assert bit_equal(T.parse_step("reshape()").apply(x.reshape(1)), x)
    assert bit_equal(T.parse_step("permute()").apply(x), x)
    assert bit_equal(T.parse_step("transpose(0,-1)").apply(x), x)
    assert bit_equal(T.parse_step("cast(bf16)").apply(x), x.bfloat16())
    assert bit_equal(T.parse_step("scale(2)").apply(x), torch.tensor(5.0))
    assert shares_storage(T.parse_step("reshape(1,1)").apply(x), x)


def test_zero_size_tensors():
    x = make((0, 3))
    assert T.parse_step("transpose").apply(x).shape == (3, 0)
    assert T.parse_step("reshape(-1)").apply(x).shape == (0,)
    assert T.parse_step("reshape(3,-1)").apply(x).shape == (3, 0)
    assert T.parse_step("slice(1,1,2)").apply(x).shape == (0, 1)
    assert T.parse_step("cast(int8)").apply(x).shape == (0, 3)
    assert T.parse_step("scale(0.5)").apply(x).shape == (0, 3)
    message = error_of(T.parse_step("reshape(0,-1)").infer, (0, 3), "float32")
    assert "ambiguous" in message and "(0, 3)" in message and "(0, -1)" in message


def test_empty_slice_is_a_view():
    x = make((4, 5))
    out = T.parse_step("slice(0,3,1)").apply(x)
    assert out.shape == (0, 5)
    assert shares_storage(out, x)


def test_apply_on_meta_device():
    x = torch.empty((4, 6, 8), device="meta", dtype=torch.bfloat16)
    tr = T.parse(["permute(2,0,1)", "slice(0,2,6)", "cast(float32)", "scale(0.5)"])
    out = tr.apply(x)
    assert out.device.type == "meta"
    assert (tuple(out.shape), str(out.dtype)) == ((4, 4, 6), "torch.float32")
    assert tr.infer(x.shape, x.dtype) == ((4, 4, 6), "float32")


def test_apply_on_dtype_outside_the_table():
    x = torch.zeros((2, 3), dtype=torch.complex128)
    assert T.parse("transpose").apply(x).shape == (3, 2)
    assert T.parse("scale(2)").apply(x).dtype == torch.complex128


# ----------------------------------------------------------------------------- reshape views


def test_reshape_of_a_non_viewable_tensor_is_an_error_in_a_view_chain():
    x = make((4, 6))
    tr = T.parse(["transpose", "reshape(-1)"])
    assert tr.is_view
    message = error_of(tr.apply, x)
    assert message.startswith("step 2 'reshape(-1)':")
    assert "(6, 4)" in message and "(24)" in message and "view" in message
    with pytest.raises(TransformError) as info:
        tr.apply(x)
    assert "tie" in info.value.hint
    # a copy may reshape
    assert bit_equal(tr.apply(x, allow_copy=True), x.t().reshape(-1))
    # a chain that copies anyway reshapes by default
    out = T.parse(["transpose", "reshape(-1)", "scale(1)"]).apply(x)
    assert bit_equal(out, x.t().reshape(-1))


def test_reshape_step_views_when_it_can():
    x = make((4, 6)).t()  # non-contiguous, but (6, 4) -> (6, 2, 2) is viewable
    out = T.parse_step("reshape(6,2,2)").apply(x)
    assert shares_storage(out, x)
    assert bit_equal(out, x.reshape(6, 2, 2))
    with pytest.raises(TransformError):
        T.parse_step("reshape(-1)").apply(x)
    assert bit_equal(T.parse_step("reshape(-1)").apply(x, allow_copy=True), x.reshape(-1))


# ----------------------------------------------------------------------------- chains


def test_identity():
    for specs in [None, [], (), "same", "SAME", ["same", " Same "], T.Transform(())]:
        tr = T.parse(specs)
        assert tr.is_identity
        assert tr.is_view
        assert tr == T.IDENTITY
        assert tr.steps == ()
        assert tr.specs() == []
        assert str(tr) == "same"
        assert tr.infer((2, 3), "int8") == ((2, 3), "int8")
    x = make((2, 3))
    assert T.IDENTITY.apply(x) is x


def test_same_steps_are_dropped():
    tr = T.parse(["same", "transpose", "SAME", "cast(bf16)"])
    assert tr.steps == (T.Transpose(), T.Cast("bfloat16"))
    assert tr.specs() == ["transpose", "cast(bfloat16)"]
    assert T.Transform((T.Same(), T.Transpose())) == T.parse("transpose")


def test_chain_infer_apply_and_str():
    tr = T.parse(["Permute(2, 0, 1)", "reshape(4,-1)", "slice(1,1,-1)", "cast(bf16)", "scale(0.5)"])
    assert tr.specs() == ["permute(2,0,1)", "reshape(4,-1)", "slice(1,1,-1)", "cast(bfloat16)", "scale(0.5)"]
    assert str(tr) == "permute(2,0,1) -> reshape(4,-1) -> slice(1,1,-1) -> cast(bfloat16) -> scale(0.5)"
    assert not tr.is_view and not tr.is_identity
    assert tr.infer((2, 3, 4), "float32") == ((4, 4), "bfloat16")
    x = make((2, 3, 4), seed=6)
    expected = (x.permute(2, 0, 1).reshape(4, -1)[:, 1:-1].bfloat16().float() * 0.5).bfloat16()
    assert bit_equal(tr.apply(x), expected)
    # the specs round-trip, as a list and as the str form
    assert T.parse(tr.specs()) == tr
    assert T.parse(str(tr)) == tr


def test_view_chain_stays_a_view():
    x = make((2, 3, 4), seed=7)
    tr = T.parse(["transpose(0,2)", "slice(0,1)", "permute(2,1,0)"])
    assert tr.is_view
    out = tr.apply(x)
    assert bit_equal(out, x.transpose(0, 2)[1:].permute(2, 1, 0))
    assert shares_storage(out, x)


def test_then_composes_in_order():
    a = T.parse(["transpose", "same"])
    b = T.parse(["reshape(-1)", "cast(f16)"])
    ab = a.then(b)
    assert ab == T.parse(["transpose", "reshape(-1)", "cast(float16)"])
    assert ab.specs() == a.specs() + b.specs()
    assert a.then(T.IDENTITY) == a and T.IDENTITY.then(a) == a
    assert a.then("scale(2)") == T.parse(["transpose", "scale(2.0)"])
    assert ab.infer((3, 4), "float32") == ((12,), "float16")
    x = make((3, 4), seed=8)
    assert bit_equal(ab.apply(x), x.t().reshape(-1).half())
    assert bit_equal(b.apply(a.apply(x, allow_copy=True)), ab.apply(x))


def test_parse_accepts_steps_and_transforms():
    tr = T.parse([T.Transpose(), "cast(bf16)"])
    assert tr == T.parse(["transpose", "cast(bfloat16)"])
    assert T.parse(tr) is tr
    assert T.parse(T.Scale(2.0)) == T.parse("scale(2)")
    assert T.parse("transpose -> CAST(bf16)") == tr


def test_transforms_are_hashable_values():
    assert hash(T.parse(["transpose"])) == hash(T.parse("TRANSPOSE"))
    assert T.parse("transpose") != T.parse("transpose(0,1)")


# ----------------------------------------------------------------------------- errors

PARSE_ERRORS = [
    (
        "permut(1,0)",
        [
            "'permut(1,0)'",
            "unknown step 'permut'",
            "valid steps: same, transpose, permute, reshape, slice, cast, scale",
        ],
    ),
    ("flip", ["unknown step 'flip'", "valid steps"]),
    ("", ["empty step"]),
    ("   ", ["empty step"]),
    ("transpose(", ["cannot parse", "NAME(ARG,...)"]),
    ("transpose)", ["cannot parse"]),
    ("permute((1,0))", ["cannot parse"]),
    ("1transpose", ["cannot parse"]),
    ("transpose(1)", ["transpose takes 0 or 2 arguments, got 1"]),
    ("transpose(0,1,2)", ["transpose takes 0 or 2 arguments, got 3"]),
    ("transpose(a,b)", ["argument 1 (dim) must be an integer, got 'a'"]),
    ("transpose(0,1.5)", ["argument 2 (dim) must be an integer, got '1.5'"]),
    ("permute(0,x)", ["argument 2 (dim) must be an integer, got 'x'"]),
    ("permute(0,,1)", ["argument 2 is empty"]),
    ("reshape(4,)", ["argument 2 is empty"]),
    ("reshape(4,2.0)", ["argument 2 (size) must be an integer, got '2.0'"]),
    ("slice(0)", ["slice takes 2 or 3 arguments, got 1"]),
    ("slice(0,1,2,3)", ["slice takes 2 or 3 arguments, got 4"]),
    ("slice(,1)", ["argument 1 (dim) is empty"]),
    ("slice(0,a)", ["argument 2 (start) must be an integer, got 'a'"]),
    ("slice(0,1,b)", ["argument 3 (stop) must be an integer, got 'b'"]),
    ("cast()", ["cast takes 1 argument, got 0"]),
    ("cast(bf16,f32)", ["cast takes 1 argument, got 2"]),
    ("cast(bfloat17)", ["unknown dtype 'bfloat17'", "valid dtypes:", "bfloat16", "int8"]),
    ("scale()", ["scale takes 1 argument, got 0"]),
    ("scale(half)", ["argument 1 (factor) must be a number, got 'half'"]),
    ("scale(nan)", ["factor must be finite"]),
    ("scale(-inf)", ["factor must be finite"]),
    ("same(1)", ["same takes 0 arguments, got 1"]),
    ("transpose -> same", ["cannot parse", "parse()"]),
]


@pytest.mark.parametrize(("text", "fragments"), PARSE_ERRORS)
def test_parse_step_errors(text, fragments):
    message = error_of(T.parse_step, text)
    assert message.startswith("step '")
    for fragment in fragments:
        assert fragment in message


def test_parse_errors_name_the_position_in_the_chain():
    message = error_of(T.parse, ["transpose", "cast(bf16)", "permute(0,,1)"])
    assert message.startswith("step 3 'permute(0,,1)':")
    message = error_of(T.parse, "transpose -> flip")
    assert message.startswith("step 2 'flip':")


def test_unknown_step_hint_suggests_a_close_name():
    with pytest.raises(TransformError) as info:
        T.parse_step("trnaspose")
    assert info.value.hint == "did you mean 'transpose'?"


def test_parse_rejects_non_strings():
    assert "must be a string, got int" in error_of(T.parse, [3])
    assert "must be a string, got int" in error_of(T.parse_step, 3)
    assert "got int" in error_of(T.parse, 5)
    assert "got int" in error_of(T.Transform, (1,))


INFER_ERRORS = [
    ("transpose", (2, 3, 4), "float32", ["expects 2 dims, got a tensor of shape (2, 3, 4)"]),
    ("transpose", (5,), "float32", ["expects 2 dims, got a tensor of shape (5)"]),
    ("transpose(0,3)", (2, 3, 4), "float32", ["dim 3 is out of range for a tensor of shape (2, 3, 4)", "-3..2"]),
    ("transpose(-4,0)", (2, 3, 4), "float32", ["dim -4 is out of range", "-3..2"]),
    ("transpose(0,1)", (), "float32", ["dim 1 is out of range for a tensor of shape ()", "-1..0"]),
    ("permute(0,1)", (4, 5, 6), "float32", ["expects 2 dims, got a tensor of shape (4, 5, 6)"]),
    ("permute(2,0,1)", (4, 5), "float32", ["expects 3 dims, got a tensor of shape (4, 5)"]),
    ("permute(0,0,1)", (4, 5, 6), "float32", ["(0, 0, 1) are not a permutation of 0..2", "repeated: 0", "(4, 5, 6)"]),
    ("permute(-1,2)", (4, 5, 6), "float32", ["expects 2 dims"]),
    ("permute(0,-1,2)", (4, 5, 6), "float32", ["not a permutation", "repeated: 2"]),
    ("permute(0,5)", (4, 5), "float32", ["dim 5 is out of range", "-2..1"]),
    ("reshape(5,-1)", (4, 6), "float32", ["shape (4, 6) (24 elements)", "(5, -1)", "24 is not a multiple of 5"]),
    ("reshape(5,5)", (4, 6), "float32", ["shape (4, 6) (24 elements)", "into (5, 5) (25 elements)"]),
    ("reshape(-1,-1)", (4, 6), "float32", ["at most one -1"]),
    ("reshape(-2,12)", (4, 6), "float32", ["sizes must be >= 0"]),
    ("reshape(0,-1)", (4, 6), "float32", ["(24 elements)", "(0, -1) (0 elements)"]),
    ("reshape(0,-1)", (0, 6), "float32", ["(0 elements)", "ambiguous"]),
    ("reshape()", (2,), "float32", ["(2) (2 elements)", "into () (1 element)"]),
    ("slice(2,0)", (4, 5), "float32", ["dim 2 is out of range for a tensor of shape (4, 5)"]),
    ("slice(0,5)", (4, 5), "float32", ["start 5 is out of range for dim 0 of size 4", "(4, 5)", "-4..4"]),
    ("slice(1,-6)", (4, 5), "float32", ["start -6 is out of range for dim 1 of size 5"]),
    ("slice(-1,0,9)", (4, 5), "float32", ["stop 9 is out of range for dim 1 of size 5", "-5..5"]),
    ("slice(0,0,1)", (), "float32", ["cannot slice a 0-d tensor"]),
    ("scale(0.5)", (4,), "bool", ["cannot scale a bool tensor"]),
    ("scale(2)", (4,), "bool", ["cannot scale a bool tensor"]),
    ("scale(0.5)", (4,), "int8", ["dtype int8 by a non-integer factor 0.5"]),
    ("scale(-2)", (4,), "uint8", ["dtype uint8 by a negative factor -2.0"]),
]


@pytest.mark.parametrize(("spec", "shape", "dtype", "fragments"), INFER_ERRORS)
def test_step_infer_errors(spec, shape, dtype, fragments):
    step = T.parse_step(spec)
    message = error_of(step.infer, shape, dtype)
    assert message.startswith(f"step '{step.spec()}': ")
    for fragment in fragments:
        assert fragment in message
    # apply() gives the same message, and touches no data
    x = make(shape, getattr(torch, dtype))
    assert error_of(step.apply, x) == message


def test_chain_errors_name_the_step_index():
    tr = T.parse(["transpose", "permute(0,1)", "cast(bf16)"])
    message = error_of(tr.infer, (4, 5, 6), "float32")
    assert message == "step 1 'transpose': expects 2 dims, got a tensor of shape (4, 5, 6)"
    tr = T.parse(["transpose(0,2)", "permute(0,1)"])
    message = error_of(tr.infer, (4, 5, 6), "float32")
    assert message == "step 2 'permute(0,1)': expects 2 dims, got a tensor of shape (6, 5, 4)"
    x = make((4, 5, 6))
    assert error_of(tr.apply, x) == message


def test_chain_is_validated_before_any_step_runs(monkeypatch):
    def boom(self, tensor, allow_copy):
        raise AssertionError("data touched before the chain was validated")

    monkeypatch.setattr(T.Cast, "_apply", boom)
    monkeypatch.setattr(T.Transpose, "_apply", boom)
    x = make((4, 5))
    with pytest.raises(TransformError, match=r"^step 2 'permute\(0,1,2\)'"):
        T.parse(["cast(bf16)", "permute(0,1,2)"]).apply(x)
    with pytest.raises(TransformError, match=r"^step 2 'scale\(0.5\)'"):
        T.parse(["transpose", "scale(0.5)"]).apply(make((2, 3), torch.int32))


def test_infer_input_errors():
    assert "unknown dtype 'floaty'" in error_of(T.parse("transpose").infer, (2, 3), "floaty")
    assert "unknown dtype 'floaty'" in error_of(T.parse_step("transpose").infer, (2, 3), "floaty")
    assert "non-negative ints" in error_of(T.parse("transpose").infer, (2, -3), "float32")
    assert "non-negative ints" in error_of(T.parse_step("transpose").infer, (2, 1.5), "float32")
    assert "non-negative ints" in error_of(T.parse_step("transpose").infer, 7, "float32")
    assert "expects a torch.Tensor, got list" in error_of(T.parse("transpose").apply, [[1]])
    assert "expects a torch.Tensor, got list" in error_of(T.parse_step("transpose").apply, [[1]])


def test_no_bare_python_errors_escape():
    texts = ["", "(", ")", "()", "a(b(c))", "slice(,,)", "reshape(-)", "cast(1)", "scale(1e999)", "permute(--1)"]
    for text in texts:
        with pytest.raises(TransformError):
            T.parse_step(text).infer((2, 3), "float32")


# ----------------------------------------------------------------------------- property


def _slicer(dim, start, stop):
    return lambda x: x[(slice(None),) * dim + (slice(start, stop),)]


@st.composite
def view_chains(draw):
    """A random shape and a chain of transpose/permute/reshape/slice steps that fits it,
    with the torch reference op of every step."""
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=4)))
    cur = shape
    specs, refs = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["transpose", "permute", "reshape", "slice"]))
        rank = len(cur)
        if kind == "transpose" and rank == 2 and draw(st.booleans()):
            spec, ref = "transpose", (lambda x: x.t())
        elif kind == "transpose":
            bound = max(rank, 1)
            d0 = draw(st.integers(-bound, bound - 1))
            d1 = draw(st.integers(-bound, bound - 1))
            spec, ref = f"transpose({d0},{d1})", (lambda x, a=d0, b=d1: x.transpose(a, b))
        elif kind == "permute":
            perm = draw(st.permutations(range(rank)))
            written = [p - rank if draw(st.booleans()) else p for p in perm]
            spec = f"permute({','.join(map(str, written))})"
            ref = lambda x, p=tuple(perm): x.permute(p)  # noqa: E731
        elif kind == "slice" and rank:
            dim = draw(st.integers(0, rank - 1))
            size = cur[dim]
            start = draw(st.integers(-size, size))
            stop = draw(st.one_of(st.none(), st.integers(-size, size)))
            written = dim - rank if draw(st.booleans()) else dim
            spec = f"slice({written},{start}{'' if stop is None else f',{stop}'})"
            ref = _slicer(dim, start, stop)
        else:
            n = 1
            for d in cur:
                n *= d
            if n == 0:
                target = list(draw(st.permutations([*cur, 0]))) if draw(st.booleans()) else [0]
            else:
                target = []
                rest = n
                for f in range(2, n + 1):
                    while rest % f == 0 and draw(st.booleans()):
                        target.append(f)
                        rest //= f
                target.append(rest)
                target = list(draw(st.permutations(target)))
                if draw(st.booleans()):
                    target[draw(st.integers(0, len(target) - 1))] = -1
            spec = f"reshape({','.join(map(str, target))})"
            ref = lambda x, t=tuple(target): x.reshape(t)  # noqa: E731
        specs.append(spec)
        refs.append(ref)
        cur, _ = T.parse_step(spec).infer(cur, "float32")
    return shape, specs, refs


@settings(max_examples=150, deadline=None)
@given(view_chains())
def test_inferred_shape_equals_applied_shape(case):
    shape, specs, refs = case
    tr = T.parse(specs)
    x = make(shape, seed=9)
    out_shape, out_dtype = tr.infer(shape, "float32")
    out = tr.apply(x, allow_copy=True)
    assert tuple(out.shape) == out_shape
    assert out_dtype == "float32"
    expected = x
    for ref in refs:
        expected = ref(expected)
    assert bit_equal(out, expected)
    assert T.parse(tr.specs()) == tr
    assert T.parse(str(tr)) == tr
    # without copies it either views the input or says why not
    try:
        view = tr.apply(x)
    except TransformError as err:
        assert "reshape" in str(err) and "without a copy" in str(err)
    else:
        assert bit_equal(view, expected)
        if x.numel() and view.numel():
            assert shares_storage(view, x)


def test_absurdly_long_integers_are_a_transform_error_not_a_crash():
    with pytest.raises(TransformError, match="more than 30 digits"):
        T.parse(["reshape(" + "9" * 5000 + ")"])
    with pytest.raises(TransformError):
        T.parse(["slice(0,1," + "1" * 40 + ")"])
