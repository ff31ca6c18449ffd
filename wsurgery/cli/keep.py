"""wsurgery keep: keep only the tensors chosen by name, module prefix or glob."""

from __future__ import annotations

from ._errors import command
from .common import CkptArg, NamesArg
from .options import OutputOptions, output_options
from .output import write_result


@command("keep")
@output_options()
def keep(ckpt: CkptArg, names: NamesArg, *, out: OutputOptions) -> int:
    """Keep only the tensors chosen by name, module prefix or glob.

    Example: wsurgery keep model.safetensors 'encoder.*' -o encoder.safetensors
    """
    from ..api import open as open_checkpoint

    with open_checkpoint(ckpt) as c:
        return write_result("keep", ckpt, c.keep(names), out)
