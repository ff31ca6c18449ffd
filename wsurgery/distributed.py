"""Scale-out on torch.distributed: one process group, work split by bytes, results
gathered, outputs committed by rank 0, and one error agreed by every rank.

A :class:`Session` joins the default process group (started from the environment that
``torchrun`` sets, ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``, or one the
caller already started). While a session of more than one rank is active
(:func:`current`), the library splits its work:

- :func:`map_by_bytes`: each rank computes its share of a list of items (tensor pairs to
  compare), chosen by bytes (:func:`split_by_bytes`); the results are gathered on every
  rank, in the items' order, so each rank builds the same report.
- :meth:`Session.shared_folder`: a folder output is built by every rank inside one
  temporary folder beside it (rank 0 creates it and tells the others its name); after
  every rank has finished, rank 0 renames it into place. Nothing is left behind when a
  rank fails.
- :meth:`Session.exchange`: the one collective wsurgery issues itself, an all-gather of
  ``(phase, error, payload)``. A rank that fails joins the next exchange with its error
  instead of its result; every rank then raises that error (the lowest failing rank's),
  so a failure anywhere fails the command everywhere with one error. A rank whose work
  fails between exchanges joins the others at their next exchange when its session ends.

Every collective is bounded by the process group's timeout (``timeout``, or the
``WSURGERY_DIST_TIMEOUT`` environment variable in seconds; 1800 by default): a rank that
died makes the others fail at once (their connections close), a rank that hangs makes
them fail after the timeout, with a :class:`~wsurgery.errors.DistributedError`.

Nothing here prints; importing this module does not import torch (it is imported when
a process group is joined).

Example:
    >>> import wsurgery
    >>> with wsurgery.distributed.session():          # doctest: +SKIP
    ...     report = wsurgery.diff("a/", "b/")          # each rank compares its share
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import DistributedError
from .partition import node_share, split_by_bytes, usable_cores

ENV_TIMEOUT = "WSURGERY_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
_AGREED = "_wsurgery_rank"  # set on an error that every rank raises: the rank it came from

_STACK: list[Session] = []


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when unset or not a number)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched() -> bool:
    """Whether this process is one of several ranks (``WORLD_SIZE`` > 1)."""
    return world_size_from_env() > 1


def current() -> Session | None:
    """The active session of more than one rank, or None (then work is not split)."""
    s = _STACK[-1] if _STACK else None
    return s if s is not None and s.world_size > 1 else None


def agreed_rank(exc: BaseException) -> int | None:
    """The rank an error came from, when every rank raised it (an agreed error); else None."""
    return getattr(exc, _AGREED, None)


def _timeout(value: float | None) -> float:
    if value is not None:
        return float(value)
    text = os.environ.get(ENV_TIMEOUT)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds > 0")
    return seconds


# --------------------------------------------------------------------------- the split


def local_workers() -> int:
    """The threads one process may take for its own work (a compare's workers): the node's
    cores shared among the processes ``torchrun`` started on it (``LOCAL_WORLD_SIZE``), so
    that two ranks on one node do not each take every core.

    Returns:
        ``max(1, cores // LOCAL_WORLD_SIZE)``; all usable cores outside ``torchrun``.

    Example:
        >>> import os; os.environ["LOCAL_WORLD_SIZE"] = "2"   # doctest: +SKIP
        >>> local_workers()                                    # doctest: +SKIP
        8
    """
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local = 1
    return node_share(usable_cores(), local)


def map_by_bytes(
    items: Sequence[Any],
    size: Callable[[Any], int],
    compute: Callable[[Any], Any],
    *,
    skipped: Callable[[int], None] | None = None,
) -> list[Any]:
    """``[compute(x) for x in items]``; under a session each rank computes its share (by
    ``size``) and the results are gathered on every rank, in order.

    Args:
        items: the work, in the order of the results.
        size: an item's bytes (what the split balances).
        compute: one item's result; it must be picklable to be gathered.
        skipped: called with the size of each item another rank computed, once the
            results are in (a progress counter reaches its total).

    Raises:
        The error of the lowest rank that failed, on every rank.
    """
    s = current()
    if s is None:
        return [compute(x) for x in items]
    sizes = [size(x) for x in items]
    owner = split_by_bytes(sizes, s.world_size)
    mine: dict[int, Any] = {}
    error = None
    try:
        for i, x in enumerate(items):
            if owner[i] == s.rank:
                mine[i] = compute(x)
    except Exception as exc:
        error = exc
    parts = s.exchange("compute", mine if error is None else None, error=error)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    if skipped is not None:
        for i, n in enumerate(sizes):
            if owner[i] != s.rank:
                skipped(n)
    return [merged[i] for i in range(len(items))]


# --------------------------------------------------------------------------- inputs every rank sees


def first_difference(a: Sequence[tuple[str, str]], b: Sequence[tuple[str, str]]) -> str | None:
    """The first fact (in ``a``'s order, then ``b``'s) on which two lists of ``(what,
    value)`` facts differ, as one line; None when they agree.

    Example:
        >>> first_difference([("w", "float32 [2]")], [("w", "float16 [2]")])
        'w: float32 [2] on rank 0, float16 [2] here'
    """
    theirs = dict(b)
    for what, value in a:
        if what not in theirs:
            return f"{what}: {value} on rank 0, absent here"
        if theirs[what] != value:
            return f"{what}: {value} on rank 0, {theirs[what]} here"
    mine = dict(a)
    for what, value in b:
        if what not in mine:
            return f"{what}: absent on rank 0, {value} here"
    return None


def agree_inputs(facts: Sequence[tuple[str, str]]) -> None:
    """Check, before any work, that every rank sees the same inputs.

    Each rank describes what it sees as ``(what, value)`` facts (names, dtypes, shapes,
    file sizes, header digests: the caller's choice); the ranks exchange a digest of
    them, and only when the digests differ the facts themselves. Every rank then raises
    the same error, naming the first rank that differs from rank 0 and the first fact.

    Args:
        facts: this rank's view of its inputs, in a deterministic order.

    Raises:
        DistributedError: some rank sees other inputs than rank 0 (on every rank).
    """
    import hashlib

    s = current()
    if s is None or s.world_size < 2:
        return
    facts = [(str(w), str(v)) for w, v in facts]
    digest = hashlib.sha256(repr(facts).encode("utf-8", "backslashreplace")).hexdigest()
    digests = s.exchange("inputs", digest)
    if len(set(digests)) == 1:
        return
    every = s.exchange("input facts", facts)
    for rank, theirs in enumerate(every):
        why = first_difference(every[0], theirs)
        if rank and why is not None:
            err = DistributedError(
                f"rank {rank} sees other inputs than rank 0: {why.replace(' here', f' on rank {rank}')}",
                hint="every rank must read the same checkpoint (copy it to each node, or use a shared file system)",
            )
            setattr(err, _AGREED, 0)  # every rank raises this very error: rank 0 reports it
            raise err
    raise DistributedError("the ranks' inputs differ in order only (a bug: please report it)")


# --------------------------------------------------------------------------- errors across ranks


def _portable(exc: BaseException, rank: int) -> dict:
    """An error as plain data: its class by name, its args and attributes (those that
    pickle), its message."""
    import pickle  # only on an error under a process group: not part of every start-up

    state = {}
    for k, v in vars(exc).items():
        try:
            pickle.dumps(v)
        except Exception:  # noqa: BLE001 - anything that does not pickle stays behind
            continue
        state[k] = v
    try:
        pickle.dumps(exc.args)
        args = exc.args
    except Exception:  # noqa: BLE001
        args = (str(exc),)
    cls = type(exc)
    return {"module": cls.__module__, "name": cls.__qualname__, "args": args, "state": state,
            "text": str(exc), "rank": rank}  # fmt: skip


def _error_class(module: str, name: str) -> type[BaseException] | None:
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module == "wsurgery" or module.startswith("wsurgery."):
        try:
            cls = importlib.import_module(module)
            for part in name.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            return None
    else:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else None


def rebuild(data: dict) -> BaseException:
    """The error :func:`_portable` described, of its own class where that is a wsurgery or
    builtin error (no constructor runs: its args and attributes are set as they were),
    else a ``RuntimeError`` naming the class. It carries the rank it came from."""
    cls = _error_class(data["module"], data["name"])
    exc: BaseException | None = None
    if cls is not None:
        try:
            exc = cls.__new__(cls, *data["args"])
            BaseException.__init__(exc, *data["args"])
            exc.__dict__.update(data["state"])
            str(exc)  # a class whose str() needs what did not travel is not rebuilt
        except Exception:  # noqa: BLE001
            exc = None
    if exc is None:
        exc = RuntimeError(f"{data['name']}: {data['text']}")
    setattr(exc, _AGREED, data["rank"])
    return exc


class _Carried(Exception):
    """An error passed through collectives that are not ours (DCP's), as plain data."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.data = data


def carry(exc: BaseException, rank: int = 0) -> _Carried:
    """Wrap ``exc`` to cross collectives that pickle errors (see :func:`uncarry`)."""
    return exc if isinstance(exc, _Carried) else _Carried(_portable(exc, rank))


def uncarry(exc: BaseException) -> BaseException:
    """The error a :func:`carry` wrapped (without the agreed mark: the caller agrees
    again), or ``exc`` itself."""
    if isinstance(exc, _Carried):
        out = rebuild(exc.data)
        with contextlib.suppress(AttributeError):
            delattr(out, _AGREED)
        return out
    return exc


# --------------------------------------------------------------------------- the session


class Session:
    """This process's place in a process group (see the module docstring).

    Attributes:
        rank: this process's rank.
        world_size: how many ranks.
        local_rank: its rank on this node (``LOCAL_RANK``).
        backend: ``"gloo"`` or ``"nccl"``.
        timeout: seconds a collective may wait.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, backend: str, timeout: float, owns: bool):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend, self.timeout, self._owns = backend, timeout, owns
        self.broken = False  # a collective failed: the group is not to be used again

    @property
    def is_first(self) -> bool:
        """Rank 0: the rank that commits outputs (and, on the command line, prints)."""
        return self.rank == 0

    def exchange(self, phase: str, payload: Any = None, *, error: BaseException | None = None) -> list[Any]:
        """Every rank's ``payload``, in rank order; every rank calls it at the same point.

        With ``error``, this rank failed: it sends its error instead. When any rank sent
        one, every rank raises the error of the lowest rank that failed (marked as agreed,
        see :func:`agreed_rank`), rebuilt where it came from another rank.

        Raises:
            DistributedError: the others did not answer within the timeout, or left.
        """
        import torch.distributed as dist

        sent = None if error is None else _portable(error, self.rank)
        mine = (phase, sent, payload if error is None else None)
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, mine)
        except Exception as exc:  # noqa: BLE001 - gloo and nccl raise RuntimeError subclasses
            raise self._lost(phase, exc) from None
        failed = [e for _, e, _ in out if e is not None]
        if failed:
            first = failed[0]
            if first["rank"] == self.rank and error is not None:
                setattr(error, _AGREED, self.rank)
                raise error
            raise rebuild(first)
        phases = sorted({p for p, _, _ in out})
        if len(phases) != 1:
            raise DistributedError(f"the ranks are out of step: at {', '.join(phases)} (a bug: please report it)")
        return [p for _, _, p in out]

    def _lost(self, phase: str, exc: BaseException) -> DistributedError:
        self.broken = True
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: the other ranks did not answer at {phase}: {first}",
            hint=f"a rank failed, was killed or is stuck; the wait is bounded by {ENV_TIMEOUT} "
            f"(now {self.timeout:g} s)",
        )

    def finish(self, error: BaseException | None = None) -> None:
        """The last exchange: every rank says whether it failed; raises the agreed error."""
        self.exchange("end", error=error)

    @contextlib.contextmanager
    def shared_folder(self, folder, *, replace: bool = False, sync: bool = True) -> Iterator[str]:
        """Yield a temporary folder beside ``folder`` that every rank writes into; once
        every rank has finished, rank 0 renames it into place (an existing folder, with
        ``replace``, is swapped out whole). When a rank fails, every rank fails with its
        error and rank 0 removes the temporary folder.

        The folder must be visible to every rank at the same path (a shared file system
        across nodes).
        """
        from .io import sharded_writer as sw

        tmp, error = None, None
        if self.is_first:
            try:
                tmp = sw.make_temporary_folder(folder, replace=replace)
            except Exception as exc:  # noqa: BLE001 - sent to the others
                error = exc
        tmp = self.exchange("folder", tmp, error=error)[0]
        committed = False
        try:
            error = None
            try:
                yield tmp
            except OSError as exc:
                error = sw.os_error(os.path.abspath(os.fspath(folder)), exc)
            except Exception as exc:  # noqa: BLE001
                error = exc
            self.exchange("written", error=error)
            if self.is_first:
                try:
                    sw.commit_temporary_folder(tmp, folder, sync=sync)
                    committed = True
                except Exception as exc:  # noqa: BLE001
                    error = exc
            self.exchange("committed", error=error)
        finally:
            if self.is_first and not committed:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)

    def first_writes(self, write: Callable[[], Any]) -> Any:
        """Rank 0 runs ``write`` (a single file: one writer); every rank gets its result."""
        result, error = None, None
        if self.is_first:
            try:
                result = write()
            except Exception as exc:  # noqa: BLE001
                error = exc
        return self.exchange("written", result, error=error)[0]


def _start(backend: str | None, device: str | None, timeout: float | None) -> Session:
    """Join the default process group, or start it from the environment."""
    from datetime import timedelta

    import torch.distributed as dist

    seconds = _timeout(timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if dist.is_available() and dist.is_initialized():
        owns = bool(_EXIT_HOOK)  # started by an earlier session of this process
        return Session(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), seconds, owns)
    world = world_size_from_env()
    if world <= 1:
        return Session(0, 1, 0, backend or "gloo", seconds, False)
    if not dist.is_available():
        raise DistributedError("this torch has no torch.distributed: it cannot run as several ranks")
    cuda = device is not None and str(device).startswith("cuda")
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        import torch

        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    try:
        rank = int(os.environ["RANK"])
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=seconds), **kwargs
        )
    except KeyError as exc:
        raise DistributedError(
            f"WORLD_SIZE is {world} but {exc.args[0]} is not set", hint="start it with torchrun"
        ) from None
    except ValueError as exc:
        raise DistributedError(f"cannot join the process group: {exc}", hint="start it with torchrun") from None
    except Exception as exc:  # noqa: BLE001 - the store's and the backend's errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DistributedError(
            f"rank {os.environ.get('RANK')} of {world}: the process group did not form: {first}",
            hint=f"every rank must start within {ENV_TIMEOUT} (now {seconds:g} s) and reach MASTER_ADDR:MASTER_PORT",
        ) from None
    return Session(dist.get_rank(), dist.get_world_size(), local_rank, backend, seconds, True)


def _stop(s: Session, broken: bool) -> None:
    """After a session: a group this module started stays up for the next session of this
    process (destroying it and starting another at once races: a fast rank would join the
    slow one's old store), and is destroyed when the process exits; one a collective
    failed in is destroyed now, so a later session starts afresh."""
    import torch.distributed as dist

    if not s._owns or not dist.is_initialized():
        return
    if broken:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    elif not _EXIT_HOOK:
        import atexit

        _EXIT_HOOK.append(True)
        atexit.register(_destroy_at_exit)


_EXIT_HOOK: list[bool] = []


def _destroy_at_exit() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def session(*, backend: str | None = None, device: str | None = None, timeout: float | None = None):
    """Run the library's work across the ranks of a process group.

    Joins the default process group if one is started, else starts one from the
    environment ``torchrun`` sets (``WORLD_SIZE`` > 1); with one rank it splits nothing.
    Inside, ``diff``, ``check`` and every write split their work across the ranks (see
    the module docstring). On leaving, every rank says whether it failed, and every rank
    raises the same error if one did; a group started here is destroyed.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; by default nccl for a CUDA ``device``, else gloo.
        device: where the work computes (``"cuda"`` picks nccl and this rank's GPU,
            ``LOCAL_RANK``).
        timeout: seconds any collective may wait (default: ``WSURGERY_DIST_TIMEOUT``, or
            1800).

    Yields:
        The :class:`Session` (``world_size`` 1 when not launched as several ranks).

    Raises:
        DistributedError: the group did not form, or a rank stopped answering.
    """
    if _STACK:  # nested: the outer session agrees and stops
        _STACK.append(_STACK[-1])
        try:
            yield _STACK[-1]
        finally:
            _STACK.pop()
        return
    if not launched():
        import sys

        dist = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            s = Session(0, 1, 0, backend or "gloo", _timeout(timeout), False)
            _STACK.append(s)
            try:
                yield s
            finally:
                _STACK.pop()
            return
    s = _start(backend, device, timeout)
    _STACK.append(s)
    try:
        try:
            yield s
        except Exception as exc:
            if s.world_size > 1 and agreed_rank(exc) is None and not isinstance(exc, DistributedError):
                try:
                    s.finish(exc)  # raises the agreed error: this one, or a lower rank's
                except DistributedError:
                    raise exc from None  # the others are gone: this rank's own error says most
            raise
        if s.world_size > 1:
            s.finish()
    finally:
        _STACK.pop()
        _stop(s, s.broken)


__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_TIMEOUT",
    "Session",
    "agree_inputs",
    "agreed_rank",
    "carry",
    "current",
    "launched",
    "local_workers",
    "map_by_bytes",
    "rebuild",
    "session",
    "split_by_bytes",
    "uncarry",
    "world_size_from_env",
]
