"""Checkpoint compare, the public names: ``diff`` pairs two checkpoints name by name,
``check`` compares ``transform(src)`` with ``dst``; both run the one pipeline
(``pipeline``) and return a report (``reports``).

The package is cut by job: ``options`` (``CompareOptions``, ``Mapper``), ``inputs`` (what
is read and how), ``pairing`` (names and tie relations), ``pipeline`` (the compare),
``reports`` (the reports and their JSON). The rules are in ``docs/compare.md``.
"""

from __future__ import annotations

from .options import CompareOptions, Mapper, serial_map
from .pipeline import check, compare_tensors, diff
from .reports import AUTO_MIN_CHANGED, REASONS, Change, CheckReport, DiffReport, PairResult
from .rollup import ModuleStats

__all__ = [
    "AUTO_MIN_CHANGED",
    "REASONS",
    "Change",
    "CheckReport",
    "CompareOptions",
    "DiffReport",
    "Mapper",
    "ModuleStats",
    "PairResult",
    "check",
    "compare_tensors",
    "diff",
    "serial_map",
]
