"""wsurgery copy: DST becomes an independent copy of transform(SRC), optionally from a second checkpoint."""

from __future__ import annotations

from ._errors import command
from .common import (
    CkptArg,
    DeviceOpt,
    DryRunOpt,
    DstOpt,
    ForceOpt,
    FromOpt,
    InPlaceOpt,
    JsonOpt,
    MaxShardOpt,
    NoSyncOpt,
    OutOpt,
    SrcOpt,
    TransformOpt,
)
from .output import finish_plan


@command("copy")
def copy(
    ckpt: CkptArg,
    src: SrcOpt,
    dst: DstOpt,
    transform: TransformOpt = None,
    from_ckpt: FromOpt = None,
    output: OutOpt = None,
    force: ForceOpt = False,
    in_place: InPlaceOpt = False,
    dry_run: DryRunOpt = False,
    device: DeviceOpt = "cpu",
    max_shard_size: MaxShardOpt = None,
    no_sync: NoSyncOpt = False,
    json_out: JsonOpt = False,
) -> int:
    """Copy transform(SRC) into DST as a tensor of its own (any steps; no alias).

    DST may be new or exist (then the result must fit its shape and dtype). A copy onto an
    alias unties it; aliases of an overwritten tensor keep their values as tensors of their own.

    Example: wsurgery copy model.pt --src encoder.layers.0 --dst decoder.layers.0 --from other.safetensors
    """
    from ..checkpoint import load
    from ..surgery import plan_copy

    c = load(ckpt)
    other = None
    try:
        if from_ckpt is not None:
            other = load(from_ckpt)
        p = plan_copy(c, src, dst, transform or [], other=other, device=device)
        return finish_plan(
            "copy", ckpt, p, output, force, in_place, dry_run, json_out, max_shard_size, sync=not no_sync
        )
    finally:
        c.close()
        if other is not None:
            other.close()
