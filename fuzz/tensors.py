"""Fuzz targets for in-memory tensors given to ``wsurgery.diff``, ``wsurgery.check`` and
``wsurgery.testing.assert_checkpoint_equal``: strided views (transpose, step slices,
expand, ``as_strided`` with zero strides, huge-but-expanded), zero-size tensors, every
common dtype (bfloat16, float16, complex, bool, integers), and the kinds that hold no
plain data (sparse COO/CSR, meta, nested, quantized).

The property: the report agrees with a plain torch reference (``torch.equal`` per name),
or the call is refused with wsurgery's own ``InputError``/``UsageError`` (the kinds
without plain data must be); any other exception, a hang (the watchdog) or a MemoryError
(the campaign's address-space limit: an expanded tensor read whole would pass it) is a
finding. ``tests/fuzz/test_tensors.py`` runs the target bounded; ``fuzz/campaign.py`` for
minutes.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import wsurgery
from tests.fuzz.test_formats import TRIED, watchdog
from wsurgery.errors import InputError, UsageError
from wsurgery.testing import assert_checkpoint_equal

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.bool,
          torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]  # fmt: skip
DENSE = ["plain", "transpose", "step", "expand", "zero_stride", "zero_size", "huge_expand", "scalar"]
NO_DATA = ["sparse_coo", "sparse_csr", "meta", "nested", "quantized"]
HUGE = 1 << 27  # elements of an expanded tensor: 512 MiB of float32 if read whole


def _values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``n`` small integers (exact in every dtype) as ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    ints = torch.randint(-3, 4, (n,), generator=g)
    if dtype == torch.bool:
        return ints > 0
    if dtype == torch.uint8:
        return ints.abs().to(dtype)
    return ints.to(dtype)


def make(kind: str, dtype: torch.dtype, rows: int, cols: int, seed: int) -> torch.Tensor:
    """One tensor of ``kind``; the dense kinds hold the same values as their contiguous copy."""
    base = _values(rows * cols, dtype, seed).reshape(rows, cols)
    if kind == "plain":
        return base
    if kind == "transpose":
        return base.t()
    if kind == "step":
        return _values(rows * cols * 3, dtype, seed).reshape(rows * 3, cols)[::3, ::1]
    if kind == "expand":
        return base[:1].expand(rows * 4, cols)
    if kind == "zero_stride":
        return _values(cols, dtype, seed).as_strided((rows, cols), (0, 1))
    if kind == "zero_size":
        return base[:0]
    if kind == "huge_expand":
        return _values(1, dtype, seed).expand(HUGE)
    if kind == "scalar":
        return _values(1, dtype, seed).reshape(())
    if kind == "sparse_coo":
        return base.to(torch.float32).to_sparse()
    if kind == "sparse_csr":
        return base.to(torch.float32).to_sparse_csr()
    if kind == "meta":
        return torch.empty(rows, cols, dtype=dtype, device="meta")
    if kind == "nested":
        return torch.nested.nested_tensor([base.to(torch.float32), base[:1].to(torch.float32)])
    if kind == "quantized":
        return torch.quantize_per_tensor(base.to(torch.float32), 0.5, 0, torch.qint8)
    raise ValueError(kind)


def _changed(t: torch.Tensor, where: int) -> torch.Tensor:
    """A contiguous copy of dense ``t`` with one element changed (``t`` when it has none)."""
    if t.numel() == 0 or t.numel() >= HUGE:
        return t
    out = t.contiguous().clone()
    flat = out.view(-1)
    i = where % flat.numel()
    flat[i] = ~flat[i] if out.dtype == torch.bool else flat[i] + 1
    return out


# one entry: (kind, dtype, rows, cols, seed, changed in b)
entries = st.lists(
    st.tuples(
        st.sampled_from(DENSE + NO_DATA),
        st.sampled_from(DTYPES),
        st.integers(1, 5),
        st.integers(1, 5),
        st.integers(0, 2**16),
        st.booleans(),
    ),  # fmt: skip
    min_size=1,
    max_size=4,
)


def in_memory_tensors(case: list[tuple[str, torch.dtype, int, int, int, bool]]) -> None:
    """Diff, check and assert-equal state dicts of odd tensors against ``torch.equal``."""
    TRIED["inputs"] += 1
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for i, (kind, dtype, rows, cols, seed, change) in enumerate(case):
        t = make(kind, dtype, rows, cols, seed)
        a[f"t{i}.{kind}"] = t
        b[f"t{i}.{kind}"] = _changed(t, seed) if change and kind in DENSE else t
    no_data = any(kind in NO_DATA for kind, *_ in case)
    try:
        with watchdog():
            report = wsurgery.diff(a, b)
            want = all(torch.equal(a[n], b[n]) for n in a)
            assert report.equal == want, (report.to_dict(), want)
            changed = {c.name for c in report.changed}
            assert changed == {n for n in a if not torch.equal(a[n], b[n])}, changed
            first = next(iter(a))
            assert wsurgery.check({**a, "copy": a[first]}, first, "copy").equal
            if want:
                assert_checkpoint_equal(a, b)
            else:
                try:
                    assert_checkpoint_equal(a, b)
                except AssertionError:
                    pass
                else:
                    raise AssertionError("assert_checkpoint_equal passed on state dicts that differ")
    except (InputError, UsageError) as exc:
        assert no_data, f"refused state dicts of dense tensors: {exc}"
        assert "\n" not in str(exc), repr(str(exc))
        TRIED["refused"] += 1
        return
    assert not no_data, "compared a tensor that holds no plain data"
    TRIED["loaded"] += 1


# name -> (strategy of one input, target), as tests/fuzz/test_formats.py's TARGETS
TARGETS = {"in_memory_tensors": (entries, in_memory_tensors)}
