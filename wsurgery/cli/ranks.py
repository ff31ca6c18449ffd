"""Commands launched as several ranks (``torchrun``, ``WORLD_SIZE`` > 1): who prints.

Every command runs inside a :func:`wsurgery.distributed.session` when launched so; the
library splits the work (``diff``, ``check``, and every write). What the command line
adds:

- rank 0 prints exactly what one process prints: its standard output is held until every
  rank has agreed that the command succeeded, then written at once; on a failure it is
  dropped and the error printed instead (so ``--json`` is one object, the report or the
  error);
- the other ranks print nothing: no standard output, no progress bars; an error every
  rank agreed on is printed by rank 0 alone, and the others exit with its code quietly.
  An error no rank could agree on (a rank that died or hung, a group that did not form)
  is printed by every rank that meets it: none of them can know who else will.
"""

from __future__ import annotations

import contextlib
import io
import sys

# Commands that compare: with a CUDA device their ranks talk over nccl, every other over gloo.
_COMPARE = frozenset({"diff", "check"})


class _Held(io.StringIO):
    """Rank 0's standard output until the ranks agree: looks like the stream it stands for."""

    def __init__(self, real):
        super().__init__()
        self.real = real

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):
        return getattr(self.real, "encoding", "utf-8")


class _Null(io.StringIO):
    def write(self, s) -> int:
        return len(s)


def silent(exc: BaseException) -> bool:
    """Whether this rank leaves ``exc`` to rank 0 to print: an error every rank raised
    (agreed), on a rank other than 0."""
    from .. import distributed

    return distributed.agreed_rank(exc) is not None and _RANK[0] not in (None, 0)


_RANK: list[int | None] = [None]  # this process's rank while a launched command runs


@contextlib.contextmanager
def ranks(command: str, kwargs: dict):
    """Run a command as one rank of several when launched so; else do nothing."""
    from .. import distributed

    if not distributed.launched():
        yield
        return
    from .common import ByteProgress

    device = kwargs.get("device") if command in _COMPARE else None
    real = sys.stdout
    held = None
    try:
        with distributed.session(device=device) as s:
            _RANK[0] = s.rank
            if s.is_first:
                held = sys.stdout = _Held(real)
            else:
                sys.stdout = _Null()
                ByteProgress.suppressed = True
            if device is not None and s.backend == "nccl" and str(device) == "cuda":
                kwargs["device"] = f"cuda:{s.local_rank}"
            try:
                yield
            finally:
                sys.stdout = real
        if held is not None:
            real.write(held.getvalue())
            real.flush()
    finally:
        sys.stdout = real
        ByteProgress.suppressed = False
