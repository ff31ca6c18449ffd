"""wsurgery concat: fuse tensors into one along an axis."""

from __future__ import annotations

from typing import Annotated

from ._errors import command
from .common import CkptArg, DimOpt, NewOpt
from .options import OutputOptions, output_options
from .output import write_result
from .params import Opt


@command("concat")
@output_options()
def concat(
    ckpt: CkptArg,
    src: Annotated[list[str], Opt("--src", help="A tensor to fuse, repeated in order.", show_default=False)],
    dst: Annotated[str, Opt("--dst", help="The fused tensor.", show_default=False)],
    dim: DimOpt = 0,
    new: NewOpt = False,
    *,
    out: OutputOptions,
) -> int:
    """Concatenate the SRC tensors along --dim into DST; the sources are gone.

    Example: wsurgery concat model.safetensors --src q.weight --src k.weight --src v.weight --dst qkv.weight
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("concat", ckpt, c.concat(src, dst, dim, new=new), out)
