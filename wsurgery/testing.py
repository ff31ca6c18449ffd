"""Assertions over checkpoints for tests (pytest, unittest): ``assert_checkpoint_equal``.

```python
import torch
from wsurgery.testing import assert_checkpoint_equal

model = torch.nn.Linear(4, 4)
assert_checkpoint_equal(model, model.state_dict())
```
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .compare import Change, DiffReport, Tuning
    from .model import Checkpoint

__all__ = ["assert_checkpoint_equal"]

SHOWN = 5  # changed tensors named in the message, the worst first
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _text(name: str, limit: int = 200) -> str:
    """A name from a file, printable on one line: control and bidirectional characters
    escaped, absurdly long names cut in the middle."""
    if len(name) > limit:
        name = f"{name[: limit // 2]}...{name[-limit // 2 :]}"
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", name)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.{digits}g}"


def _worst_first(changes: list[Change]) -> list[Change]:
    """Differences where a NaN or an infinity appeared (or moved) first, as the report sorts
    them; then shape, dtype and tie changes (in the report's order); then value changes by
    ``rel_l2``, largest first."""

    def key(c: Change) -> tuple[bool, bool, float]:
        rel = c.stats.rel_l2 if c.stats is not None and c.stats.rel_l2 is not None else -1.0
        return (not c.unbounded, c.reason == "value", -rel if c.reason == "value" else 0.0)

    return sorted(changes, key=key)


def _describe(c: Change) -> str:
    s = c.stats
    line = f"  {_text(c.name)}: {c.reason}"
    if c.reason == "shape":
        return f"{line} {tuple(c.a['shape'])} vs {tuple(c.b['shape'])}"
    if c.reason == "dtype":
        line += f" {c.a['dtype']} vs {c.b['dtype']}"
    elif c.reason == "alias":
        line += f" (tie {c.a['alias_of'] or 'none'} vs {c.b['alias_of'] or 'none'})"
    if s is not None:
        cosine = "a NaN or infinity differs" if c.unbounded else f"cosine {_num(s.cosine, 6)}"
        line += (
            f", rel_l2 {_num(s.rel_l2)}, {cosine}, max_abs_diff {_num(s.max_abs_diff)}, "
            f"{s.mismatched:,} of {s.numel:,} elements differ"
        )
    return line


def _message(report: DiffReport, shown: int) -> str:
    crit = report.criteria.describe() + (", ties ignored" if report.ignore_ties else "")
    head = (
        f"checkpoints differ ({crit}): {len(report.changed)} changed, {len(report.only_in_a)} only in actual, "
        f"{len(report.only_in_b)} only in expected, {report.same} same"
    )
    lines = [head]
    worst = _worst_first(report.changed)
    lines += [_describe(c) for c in worst[:shown]]
    if len(worst) > shown:
        lines.append(f"  ... and {len(worst) - shown} more changed")
    for label, names in (("only in actual", report.only_in_a), ("only in expected", report.only_in_b)):
        if names:
            more = f" ... and {len(names) - shown} more" if len(names) > shown else ""
            lines.append(f"{label}: {', '.join(_text(n) for n in names[:shown])}{more}")
    return "\n".join(lines)


def assert_checkpoint_equal(
    actual: Checkpoint | Mapping[str, Any] | torch.nn.Module | str | os.PathLike[str],
    expected: Checkpoint | Mapping[str, Any] | torch.nn.Module | str | os.PathLike[str],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    max_rel_l2: float | None = None,
    min_cosine: float | None = None,
    ignore_ties: bool = False,
    filter: str | None = None,  # noqa: A002 - a glob on names
    device: str | None = None,
    shown: int = SHOWN,
    msg: str | None = None,
    tuning: Tuning | None = None,
) -> DiffReport:
    """Assert that two checkpoints hold the same tensors, for tests.

    The comparison is :func:`wsurgery.diff` of ``actual`` against ``expected``: every name
    on both sides, the same shapes, dtypes and ties (unless ``ignore_ties``), and values
    equal by every stated criterion. As in ``torch.testing.assert_close``, ``rtol`` is
    relative to ``expected`` (``|actual - expected| <= atol + rtol * |expected|``);
    ``rel_l2`` is ``||actual - expected|| / ||actual||``.

    Args:
        actual: a path (any readable format), a loaded checkpoint, a state dict or a
            ``torch.nn.Module`` (its ``state_dict()``), on any device.
        expected: the reference, of the same kinds.
        atol, rtol: element-wise tolerance; both 0 (the default) is exact equality,
            unless ``max_rel_l2`` or ``min_cosine`` is given (then only those apply).
        max_rel_l2: a tensor whose ``rel_l2`` is at most this counts as equal.
        min_cosine: a tensor whose cosine similarity is at least this counts as equal.
        ignore_ties: compare values only: a tie on one side and a stored copy on the
            other are equal when their values are.
        filter: a selector (exact name, module prefix or glob): only the names it
            selects are compared.
        device: where to compare (``"cuda"``); None keeps each tensor where it is.
        shown: how many changed tensors the message names (the worst first).
        msg: a line to put before the summary.
        tuning: threads (``wsurgery.compare.Tuning``); never changes a result.

    Returns:
        The ``DiffReport`` (equal), for further checks.

    Raises:
        AssertionError: the checkpoints differ; the message has one line per changed
            tensor (the ``shown`` worst: shape, dtype and tie changes first, then by
            ``rel_l2``) and the names on one side only.
        UsageError, InputError: as for :func:`wsurgery.diff`.

    Example:

    ```python
    import torch
    from wsurgery.testing import assert_checkpoint_equal

    model = torch.nn.Linear(4, 4)
    assert_checkpoint_equal(model, {k: v.clone() for k, v in model.state_dict().items()})
    ```
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    from .api import compare_mapper
    from .compare import diff

    report = diff(
        actual,
        expected,
        mapper=compare_mapper(),
        atol=atol,
        rtol=rtol,
        device=device,
        filter=filter,
        max_rel_l2=max_rel_l2,
        min_cosine=min_cosine,
        ignore_ties=ignore_ties,
        tuning=tuning,
    )
    if not report.equal:
        text = _message(report, max(0, int(shown)))
        raise AssertionError(f"{msg}\n{text}" if msg else text)
    return report
