"""wsurgery rename: a regular expression over every name; aliases follow."""

from __future__ import annotations

from typing import Annotated

from ._errors import command
from .common import CkptArg
from .options import OutputOptions, output_options
from .output import write_result
from .params import Arg


@command("rename")
@output_options()
def rename(
    ckpt: CkptArg,
    pattern: Annotated[str, Arg(metavar="PATTERN", help="A Python regular expression.")],
    replacement: Annotated[str, Arg(metavar="REPLACEMENT", help="What it becomes (\\1 for groups).")],
    *,
    out: OutputOptions,
) -> int:
    """Rename every tensor by a regular expression; aliases follow.

    Each name becomes re.sub(PATTERN, REPLACEMENT, name). Two names onto one, or a pattern
    that matches nothing, is refused.

    Example: wsurgery rename model.pt '^module\\.' '' -o model.safetensors
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("rename", ckpt, c.rename(pattern, replacement), out)
