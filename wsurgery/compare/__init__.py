"""Compare tensors and checkpoints.

``diff`` and ``check`` compare checkpoints (``report``); ``compare_arrays`` compares one
pair of arrays or tensors (``kernel``). ``Tuning`` says how many threads they may use;
it never changes a result. The rules are in ``docs/compare.md``.
"""

from __future__ import annotations

from .criteria import Criteria
from .kernel import PairStream, TensorStats, Tuning, compare_arrays
from .report import Change, CheckReport, DiffReport, ModuleStats, PairResult, check, compare_tensors, diff

__all__ = [
    "Change",
    "CheckReport",
    "Criteria",
    "DiffReport",
    "ModuleStats",
    "PairResult",
    "PairStream",
    "TensorStats",
    "Tuning",
    "check",
    "compare_arrays",
    "compare_tensors",
    "diff",
]
