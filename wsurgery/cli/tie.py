"""wsurgery tie: make DST an alias of transform(SRC), stored once."""

from __future__ import annotations

from ._errors import command
from .common import CkptArg, DstOpt, SrcOpt, TieTransformOpt
from .options import OutputOptions, output_options
from .output import write_result


@command("tie")
@output_options()
def tie(ckpt: CkptArg, src: SrcOpt, dst: DstOpt, transform: TieTransformOpt = None, *, out: OutputOptions) -> int:
    """Tie DST to SRC: store SRC once and record DST as its alias (view steps only: same,
    transpose, permute, reshape, slice). An alias as SRC resolves to its stored source.

    Example: wsurgery tie model.pt --src embedding.weight --dst projection.weight
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("tie", ckpt, c.tie(src, dst, transform), out)
