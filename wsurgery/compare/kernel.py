"""The compare kernel: equality and statistics of one tensor pair, on numpy arrays or on
torch tensors on any device.

``compare_arrays`` compares two whole arrays; ``compare_flat`` streams two flat ones
chunk by chunk (raw bytes screened first, pages released behind it), as ``diff`` and
``check`` do; ``PairStream`` takes a pair piece by piece. All three give the same
statistics (``TensorStats``) by the same per-element rules, whatever the ``Tuning``.
Importing this module, or comparing numpy arrays, never imports torch.

The kernel is cut by job:

- ``stats``: ``TensorStats``, ``Tuning``, argument checks, the accumulated float64 sums;
- ``threads``: ``parallel_map`` and the float64 dot products held on one BLAS thread;
- ``backends``: numpy / torch primitives and the per-element rules of a block (``_Cmp``);
- ``float_kernel``: the real-float CPU kernel, ``PairStream``, ``compare_arrays``;
- ``streaming``: ``compare_flat`` (byte screening, identical sums, pages released),
  ``l2_norm``.

The rules are described in ``docs/compare.md``.
"""

from __future__ import annotations

from .backends import DEFAULT_CHUNK_ELEMS
from .float_kernel import PairStream, compare_arrays
from .stats import TensorStats, Tuning, check_shapes, check_tolerances, json_float, resolve_tuning
from .streaming import CHUNK_BYTES, compare_flat, l2_norm
from .threads import ONE_THREAD_BLAS, parallel_map

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CHUNK_ELEMS",
    "ONE_THREAD_BLAS",
    "PairStream",
    "TensorStats",
    "Tuning",
    "check_shapes",
    "check_tolerances",
    "compare_arrays",
    "compare_flat",
    "json_float",
    "l2_norm",
    "parallel_map",
    "resolve_tuning",
]
