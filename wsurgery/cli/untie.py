"""wsurgery untie: store aliases as tensors of their own, for loaders that know no alias metadata."""

from __future__ import annotations

from ._errors import command
from .common import CkptArg, DeviceOpt, UntieDstOpt
from .options import OutputOptions, output_options
from .output import write_result


@command("untie")
@output_options()
def untie(ckpt: CkptArg, dst: UntieDstOpt = None, device: DeviceOpt = "cpu", *, out: OutputOptions) -> int:
    """Store the named aliases (every alias by default) as tensors of their own.

    Example: wsurgery untie model.safetensors -o model.untied.safetensors
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("untie", ckpt, c.untie(dst or None, device=device), out)
