"""Bounded property test over in-memory tensors of every kind (the target of
``fuzz/tensors.py``): a diff, check or assert-equal of strided views, zero-size, expanded,
complex, bool, integer and half-precision tensors agrees with ``torch.equal``, and sparse,
meta, nested and quantized tensors are refused with wsurgery's own error. ``make fuzz``
runs the target for minutes, huge expanded tensors included."""

from __future__ import annotations

import resource

import torch
from hypothesis import given, settings

from fuzz.tensors import HUGE, TARGETS, in_memory_tensors
from tests.fuzz.test_formats import PROFILE, TRIED

strategy, _ = TARGETS["in_memory_tensors"]
small = strategy.filter(lambda case: all(kind != "huge_expand" for kind, *_ in case))  # huge: below, once
test_in_memory_tensors = settings(settings.get_profile(PROFILE), max_examples=300, deadline=None)(
    given(small)(in_memory_tensors)
)


def test_each_kind_alone_is_compared_or_refused():
    before = dict(TRIED)
    kinds = ["plain", "transpose", "step", "expand", "zero_stride", "zero_size", "scalar"]
    for kind in kinds:
        for dtype in (torch.bfloat16, torch.float16, torch.complex64, torch.bool, torch.uint8, torch.int64):
            in_memory_tensors([(kind, dtype, 3, 2, 7, True)])
    for kind in ["sparse_coo", "sparse_csr", "meta", "nested", "quantized"]:
        in_memory_tensors([(kind, torch.float32, 3, 2, 7, False), ("plain", torch.float32, 2, 2, 1, True)])
    assert TRIED["refused"] - before["refused"] == 5 and TRIED["loaded"] - before["loaded"] == 6 * len(kinds)


def test_a_huge_expanded_tensor_is_compared_without_reading_it_whole():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    in_memory_tensors([("huge_expand", torch.complex64, 1, 1, 3, False)])  # 1 GiB if materialized
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak
    assert grown < HUGE * 8 / (1 << 20) / 4, f"the peak grew by {grown:.0f} MiB"
