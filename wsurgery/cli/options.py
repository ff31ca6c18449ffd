"""The output flags every writing command shares, bundled into one ``OutputOptions``.

A command declares ``out: OutputOptions`` and decorates itself with :func:`output_options`;
typer then sees the shared flags (``-o``, ``--format``, ``--force``, ``--in-place``,
``--dry-run``, ``--max-shard-size``, ``--no-sync``, ``--json``) as parameters of the command, and the
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

import typer

from .common import JsonOpt

OutOpt = Annotated[
    Optional[str],  # a str, not a Path: a final "/" (a folder output) must survive
    typer.Option(
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
    typer.Option(
        "--format",
        help="safetensors, torch (a torch.save zip file that torch.load reads, ties as shared storage) or dcp (a "
        "torch.distributed.checkpoint folder, ties written as values); default: from -o's suffix.",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="Allow the output to replace the input.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan and write nothing (no -o needed).")]
MaxShardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--max-shard-size",
        help="Write shards of at most this size (5GB, 500MiB, bytes) and an index into the folder OUT.",
        show_default=False,
    ),
]
NoSyncOpt = Annotated[
    bool,
    typer.Option(
        "--no-sync",
        help="Do not wait for the output to reach the disk (skip fsync): faster, still atomic, but an OS crash or "
        "power loss soon after may lose or truncate it.",
    ),
]
KeepAliasesOpt = Annotated[
    bool,
    typer.Option(
        "--keep-aliases",
        help="In a model-folder output, keep every tie as a wsurgery alias record (from_pretrained restores only "
        "the head tie; by default the others are written as values).",
    ),
]
FlatOpt = Annotated[
    bool,
    typer.Option("--flat", help="Write a torch output as a flat state dict, not in the input's structure."),
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
    keep_aliases: bool = False
    flat: bool = False


# (parameter name, annotation, default); dry_run only for commands that plan
_SHARED = [
    ("output", OutOpt, None),
    ("format", FormatOpt, None),
    ("force", ForceOpt, False),
    ("in_place", InPlaceOpt, False),
    ("dry_run", DryRunOpt, False),
    ("max_shard_size", MaxShardOpt, None),
    ("no_sync", NoSyncOpt, False),
    ("json_out", JsonOpt, False),
    ("keep_aliases", KeepAliasesOpt, False),
    ("flat", FlatOpt, False),
]


def output_options(*, dry_run: bool = True):
    """Give a command the shared output flags; it receives them as ``out: OutputOptions``."""
    shared = [s for s in _SHARED if dry_run or s[0] != "dry_run"]

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != "out"]
        params += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
            for name, ann, default in shared
        ]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            raw = kwargs.pop("output", None)
            out = OutputOptions(
                output=None if raw is None else Path(raw),
                output_folder=raw is not None and raw.endswith(("/", os.sep)),
                format=kwargs.pop("format", None),
                force=kwargs.pop("force", False),
                in_place=kwargs.pop("in_place", False),
                dry_run=kwargs.pop("dry_run", False),
                max_shard_size=kwargs.pop("max_shard_size", None),
                sync=not kwargs.pop("no_sync", False),
                json=kwargs.pop("json_out", False),
                keep_aliases=kwargs.pop("keep_aliases", False),
                flat=kwargs.pop("flat", False),
            )
            return fn(*args, out=out, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        return wrapper

    return deco
