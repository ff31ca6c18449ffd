"""Compare tensors and checkpoints: ``diff``, ``check`` and ``compare_arrays``."""

from __future__ import annotations

from .kernel import PairStream, TensorStats, compare_arrays
from .report import Change, CheckReport, DiffReport, PairResult, check, compare_tensors, diff

__all__ = [
    "Change",
    "CheckReport",
    "DiffReport",
    "PairResult",
    "PairStream",
    "TensorStats",
    "check",
    "compare_arrays",
    "compare_tensors",
    "diff",
]
