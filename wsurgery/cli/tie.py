"""wsurgery tie: make DST an alias of transform(SRC), stored once."""

from __future__ import annotations

from typing import Annotated

from ._errors import command
from .common import CkptArg, DstOpt, NewOpt, SrcOpt, TieTransformOpt
from .options import OutputOptions, Tolerances, output_options, tolerance_options
from .output import write_result
from .params import Opt

VerifyOpt = Annotated[
    bool,
    Opt("--verify", help="Refuse unless DST already equals transform(SRC) within --atol/--rtol (reads both)."),
]


@command("tie")
@output_options()
@tolerance_options(thresholds=False)
def tie(
    ckpt: CkptArg,
    src: SrcOpt,
    dst: DstOpt,
    transform: TieTransformOpt = None,
    new: NewOpt = False,
    verify: VerifyOpt = False,
    *,
    tol: Tolerances,
    out: OutputOptions,
) -> int:
    """Tie DST to SRC: store SRC once and record DST as its alias.

    View steps only (same, transpose, permute, reshape, slice). An alias as SRC resolves to
    its stored source. With --verify, a DST that is stored today must already hold the same
    values: the safe way to dedupe a head stored twice.

    Example: wsurgery tie model.pt --src embedding.weight --dst projection.weight --verify
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        result = c.tie(src, dst, transform, new=new, verify=verify, atol=tol.atol, rtol=tol.rtol)
        return write_result("tie", ckpt, result, out)
