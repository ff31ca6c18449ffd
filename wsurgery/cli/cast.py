"""wsurgery cast: floating tensors to another floating dtype, ties kept."""

from __future__ import annotations

from typing import Annotated, Optional

from ._errors import command
from .common import CkptArg, DeviceOpt
from .options import OutputOptions, output_options
from .output import write_result
from .params import Arg, Opt

GlobsOpt = Optional[list[str]]


@command("cast")
@output_options()
def cast(
    ckpt: CkptArg,
    dtype: Annotated[str, Arg(metavar="DTYPE", help="float32, bfloat16, float16, float8_e4m3fn, ...")],
    only: Annotated[
        GlobsOpt,
        Opt("--only", help="Cast only these tensors: an exact name, a module prefix or a glob (repeatable)."),
    ] = None,
    exclude: Annotated[
        GlobsOpt,
        Opt("--except", help="Leave these tensors as they are: an exact name, a module prefix or a glob (repeatable)."),
    ] = None,
    device: DeviceOpt = "cpu",
    *,
    out: OutputOptions,
) -> int:
    """Cast floating tensors to DTYPE, keeping ties.

    Integers and bool are never cast. A tied source is cast once and its aliases follow it.

    Example: wsurgery cast model.safetensors bfloat16 --except '*norm*' -o model.bf16.safetensors
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("cast", ckpt, c.cast(dtype, only=only or (), exclude=exclude or (), device=device), out)
