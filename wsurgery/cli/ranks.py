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

# The command arguments that name inputs (checkpoints, recipes), in this order.
_INPUTS = ("recipe", "a", "b", "ckpt", "ckpts", "other", "from_ckpt", "base", "models")
_HEAD = 64 << 10  # bytes hashed at each end of an input file: headers, zip directories


def _ends_digest(path: str, size: int) -> str:
    """sha256 of a file's first and last 64 KiB: the header of a safetensors file, a torch
    zip's central directory, a whole small metadata file. Not the tensor data between."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD))
        if size > 2 * _HEAD:
            f.seek(size - _HEAD)
            h.update(f.read(_HEAD))
        elif size > _HEAD:
            h.update(f.read())
    return h.hexdigest()[:16]


def _paths(kwargs: dict) -> list[str]:
    import os

    out = []
    for key in _INPUTS:
        value = kwargs.get(key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)):
                out.append(os.fspath(v))
    return out


def input_facts(kwargs: dict) -> list[tuple[str, str]]:
    """What this rank sees of a command's inputs, as ``(what, value)`` facts: each
    checkpoint's format, tensor names with dtype and shape, aliases, and each file it
    reads (relative to the input) with its size and a digest of its two ends. Paths are
    named as the command line gave them, so two nodes that hold the same checkpoint
    under the same relative path agree. A checkpoint that cannot be opened is one fact
    (the command then meets the error itself)."""
    import os

    import wsurgery
    from wsurgery.errors import WsurgeryError

    facts: list[tuple[str, str]] = []
    for i, p in enumerate(_paths(kwargs)):
        facts.append((f"input {i + 1}", p))
        if not os.path.exists(p):
            facts.append((p, "missing"))
            continue
        if os.path.isfile(p) and p.endswith((".yaml", ".yml", ".json")):
            size = os.path.getsize(p)
            facts.append((p, f"{size} bytes, digest {_ends_digest(p, size)}"))
            continue
        try:
            ckpt = wsurgery.open(p)
        except (WsurgeryError, OSError) as exc:
            facts.append((p, f"unreadable ({type(exc).__name__})"))
            continue
        with ckpt:
            facts.append((f"{p}: format", str(ckpt.format)))
            for name in sorted(ckpt.stored):
                s = ckpt.stored[name]
                facts.append((f"{p}: tensor {name!r}", f"{s.dtype} {list(s.shape)}"))
            for name in sorted(ckpt.aliases):
                facts.append((f"{p}: alias {name!r}", "alias"))
            base = p if os.path.isdir(p) else os.path.dirname(p)
            for f in sorted(ckpt.input_files):
                size = os.path.getsize(f)
                rel = os.path.relpath(f, os.path.abspath(base) or ".")
                facts.append((f"{p}: file {rel}", f"{size} bytes, header digest {_ends_digest(f, size)}"))
    return facts


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
            distributed.agree_inputs(input_facts(kwargs))
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
