"""wsurgery copy: DST becomes an independent copy of transform(SRC), optionally from a second checkpoint."""

from __future__ import annotations

import contextlib

from ._errors import command
from .common import CkptArg, DeviceOpt, DstOpt, FromOpt, NewOpt, SrcOpt, TransformOpt
from .options import OutputOptions, output_options
from .output import write_result


@command("copy")
@output_options()
def copy(
    ckpt: CkptArg,
    src: SrcOpt,
    dst: DstOpt,
    transform: TransformOpt = None,
    from_ckpt: FromOpt = None,
    device: DeviceOpt = "cpu",
    new: NewOpt = False,
    *,
    out: OutputOptions,
) -> int:
    """Copy transform(SRC) into DST as a tensor of its own.

    DST may be new or exist (it is replaced, whatever its shape or dtype). A copy onto an
    alias unties it; aliases of a replaced tensor keep their values. Repeat --src/--dst in
    pairs; every pair reads the input as it is, so two copies can swap two tensors.

    Example: wsurgery copy model.pt --src encoder.layers.0 --dst decoder.layers.0 --from other.safetensors
    """
    from ..api import open as open_checkpoint

    with contextlib.ExitStack() as stack:
        c = stack.enter_context(open_checkpoint(ckpt))
        other = None if from_ckpt is None else stack.enter_context(open_checkpoint(from_ckpt))
        return write_result("copy", ckpt, c.copy(src, dst, transform, other=other, device=device, new=new), out)
