"""wsurgery split: cut a tensor into pieces along an axis."""

from __future__ import annotations

from typing import Annotated

from ..errors import UsageError
from ._errors import command
from .common import CkptArg, DimOpt, NewOpt
from .options import OutputOptions, output_options
from .output import write_result
from .params import Opt


def _sizes(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise UsageError(f"sizes must be integers separated by commas, got {text!r}", param="sizes") from None


@command("split")
@output_options()
def split(
    ckpt: CkptArg,
    src: Annotated[str, Opt("--src", help="The tensor to cut.", show_default=False)],
    dst: Annotated[list[str], Opt("--dst", help="A piece, repeated in order.", show_default=False)],
    sizes: Annotated[str, Opt("--sizes", help="The pieces' sizes along --dim: N,N,...", show_default=False)],
    dim: DimOpt = 0,
    new: NewOpt = False,
    *,
    out: OutputOptions,
) -> int:
    """Split SRC along --dim into the DST pieces of the given --sizes; SRC is gone.

    Example: wsurgery split model.safetensors --src qkv.weight --dst q.weight --dst k.weight --dst v.weight
    --sizes 64,64,64
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("split", ckpt, c.split(src, dst, dim, _sizes(sizes), new=new), out)
