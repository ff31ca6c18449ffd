"""The output flags every writing command shares, bundled into one ``OutputOptions``.

A command declares ``out: OutputOptions`` and decorates itself with :func:`output_options`;
typer then sees the shared flags (``-o``, ``--format``, ``--force``, ``--in-place``,
``--dry-run``, ``--max-shard-size``, ``--no-sync``, ``--json``, ``--quiet``) as parameters of the command, and the
command receives them as one value. Adding a flag to every writing command is one edit
here.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

from .common import JsonOpt
from .params import Opt

OutOpt = Annotated[
    Optional[str],  # a str, not a Path: a final "/" (a folder output) must survive
    Opt(
        "--output",
        "-o",
        metavar="PATH",
        help="Output path: .safetensors, or .pt/.pth/.bin/.ckpt for a torch.save file (default: the input's path "
        "with .safetensors, or .pt with --format torch); a folder with --max-shard-size, for an existing folder or a "
        "path ending in /, and for a folder input when OUT has no weights suffix.",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    Optional[str],
    Opt(
        "--format",
        help="safetensors, torch (a torch.save zip file that torch.load reads, ties as shared storage) or dcp (a "
        "torch.distributed.checkpoint folder, ties written as values); default: from -o's suffix.",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, Opt("--force", "-f", help="Overwrite an existing output.")]
InPlaceOpt = Annotated[bool, Opt("--in-place", help="Allow the output to replace the input.")]
DryRunOpt = Annotated[bool, Opt("--dry-run", "-n", help="Print the plan and write nothing (no -o needed).")]
MaxShardOpt = Annotated[
    Optional[str],
    Opt(
        "--max-shard-size",
        help="Write shards of at most this size (5GB, 500MiB, bytes) and an index into the folder OUT.",
        show_default=False,
    ),
]
NoSyncOpt = Annotated[
    bool,
    Opt(
        "--no-sync",
        help="Do not wait for the output to reach the disk (skip fsync): faster, still atomic, but an OS crash or "
        "power loss soon after may lose or truncate it.",
    ),
]
KeepAliasesOpt = Annotated[
    bool,
    Opt(
        "--keep-aliases",
        help="In a model-folder output, keep every tie as a wsurgery alias record (from_pretrained restores only "
        "the head tie; by default the others are written as values).",
    ),
]
FlatOpt = Annotated[
    bool,
    Opt("--flat", help="Write a torch output as a flat state dict, not in the input's structure."),
]


WriteQuietOpt = Annotated[
    bool, Opt("--quiet", "-q", help="Print no plan and no summary, only errors; the exit code says it all.")
]


@dataclass(frozen=True)
class OutputOptions:
    """Where and how a writing command writes its result."""

    output: Path | None = None
    output_folder: bool = False  # -o ended with a path separator: the output is a folder
    format: str | None = None
    force: bool = False
    in_place: bool = False
    dry_run: bool = False
    max_shard_size: str | None = None
    sync: bool = True
    json: bool = False
    quiet: bool = False
    keep_aliases: bool = False
    flat: bool = False


_WRITE = OutputOptions()  # every output flag's default, from the options object (declared once)

# (parameter name, annotation, default); dry_run only for commands that plan
_SHARED = [
    ("output", OutOpt, _WRITE.output),
    ("format", FormatOpt, _WRITE.format),
    ("force", ForceOpt, _WRITE.force),
    ("in_place", InPlaceOpt, _WRITE.in_place),
    ("dry_run", DryRunOpt, _WRITE.dry_run),
    ("max_shard_size", MaxShardOpt, _WRITE.max_shard_size),
    ("no_sync", NoSyncOpt, not _WRITE.sync),
    ("json_out", JsonOpt, _WRITE.json),
    ("quiet", WriteQuietOpt, _WRITE.quiet),
    ("keep_aliases", KeepAliasesOpt, _WRITE.keep_aliases),
    ("flat", FlatOpt, _WRITE.flat),
]


def _bundled(fn, name: str, shared: list, build):
    """``fn`` with the flags ``shared`` in place of its parameter ``name``: typer sees each
    flag; ``fn`` receives ``build(kwargs)`` (which pops the flags it reads) as ``name``."""
    sig = inspect.signature(fn, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != name]
    keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d) for n, a, d in shared]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bundle = build(kwargs)
        return fn(*args, **{name: bundle}, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=positional + keyword + added)  # type: ignore[attr-defined]
    return wrapper


def output_options(*, dry_run: bool = True):
    """Give a command the shared output flags; it receives them as ``out: OutputOptions``."""
    shared = [s for s in _SHARED if dry_run or s[0] != "dry_run"]

    def build(kwargs: dict) -> OutputOptions:
        raw = kwargs.pop("output", _WRITE.output)
        return OutputOptions(
            output=None if raw is None else Path(raw),
            output_folder=raw is not None and str(raw).endswith(("/", os.sep)),
            format=kwargs.pop("format", _WRITE.format),
            force=kwargs.pop("force", _WRITE.force),
            in_place=kwargs.pop("in_place", _WRITE.in_place),
            dry_run=kwargs.pop("dry_run", _WRITE.dry_run),
            max_shard_size=kwargs.pop("max_shard_size", _WRITE.max_shard_size),
            sync=not kwargs.pop("no_sync", not _WRITE.sync),
            json=kwargs.pop("json_out", _WRITE.json),
            quiet=kwargs.pop("quiet", _WRITE.quiet),
            keep_aliases=kwargs.pop("keep_aliases", _WRITE.keep_aliases),
            flat=kwargs.pop("flat", _WRITE.flat),
        )

    return lambda fn: _bundled(fn, "out", shared, build)


@dataclass(frozen=True)
class Tolerances:
    """When two tensors count as equal (``diff``, ``check``, ``tie --verify``): each element
    within ``atol + rtol * |b|``, and, when stated, ``rel_l2 <= max_rel_l2`` and
    ``cosine >= min_cosine``. The defaults (bitwise) are declared here once."""

    atol: float = 0.0
    rtol: float = 0.0
    max_rel_l2: float | None = None
    min_cosine: float | None = None

    def kwargs(self) -> dict:
        """As the library's keyword arguments."""
        return {"atol": self.atol, "rtol": self.rtol, "max_rel_l2": self.max_rel_l2, "min_cosine": self.min_cosine}


_TOL = Tolerances()


def tolerance_options(*, thresholds: bool = True):
    """Give a command ``--atol``/``--rtol`` (and ``--max-rel-l2``/``--min-cosine`` with
    ``thresholds``); it receives them as ``tol: Tolerances``."""
    from .common import AtolOpt, MaxRelL2Opt, MinCosineOpt, RtolOpt

    shared: list[tuple[str, object, object]] = [("atol", AtolOpt, _TOL.atol), ("rtol", RtolOpt, _TOL.rtol)]
    if thresholds:
        shared += [("max_rel_l2", MaxRelL2Opt, _TOL.max_rel_l2), ("min_cosine", MinCosineOpt, _TOL.min_cosine)]

    def build(kwargs: dict) -> Tolerances:
        return Tolerances(
            atol=kwargs.pop("atol", _TOL.atol),
            rtol=kwargs.pop("rtol", _TOL.rtol),
            max_rel_l2=kwargs.pop("max_rel_l2", _TOL.max_rel_l2),
            min_cosine=kwargs.pop("min_cosine", _TOL.min_cosine),
        )

    return lambda fn: _bundled(fn, "tol", shared, build)
