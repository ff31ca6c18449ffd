"""Compare tensors and checkpoints.

``diff`` and ``check`` compare checkpoints (``report``); ``compare_arrays`` compares one
pair of arrays or tensors (``kernel``). ``Tuning`` says how many threads they may use;
it never changes a result; ``CompareOptions`` holds every option of ``diff`` and
``check``. The rules are in ``docs/compare.md``.
"""

from __future__ import annotations

from .criteria import Criteria
from .kernel import PairStream, TensorStats, Tuning, compare_arrays
from .report import (
    Change,
    CheckReport,
    CompareOptions,
    DiffReport,
    Mapper,
    ModuleStats,
    PairResult,
    check,
    compare_tensors,
    diff,
    serial_map,
)

__all__ = [
    "Change",
    "CheckReport",
    "CompareOptions",
    "Criteria",
    "DiffReport",
    "Mapper",
    "ModuleStats",
    "PairResult",
    "PairStream",
    "TensorStats",
    "Tuning",
    "check",
    "compare_arrays",
    "compare_tensors",
    "diff",
    "serial_map",
]
