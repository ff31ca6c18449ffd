"""wsurgery untie: store aliases as tensors of their own, for loaders that know no alias metadata."""

from __future__ import annotations

from ._errors import command
from .common import (
    CkptArg,
    DeviceOpt,
    DryRunOpt,
    ForceOpt,
    InPlaceOpt,
    JsonOpt,
    MaxShardOpt,
    NoSyncOpt,
    OutOpt,
    UntieDstOpt,
)
from .output import finish_plan


@command("untie")
def untie(
    ckpt: CkptArg,
    dst: UntieDstOpt = None,
    output: OutOpt = None,
    force: ForceOpt = False,
    in_place: InPlaceOpt = False,
    dry_run: DryRunOpt = False,
    device: DeviceOpt = "cpu",
    max_shard_size: MaxShardOpt = None,
    no_sync: NoSyncOpt = False,
    json_out: JsonOpt = False,
) -> int:
    """Store the named aliases (every alias by default) as tensors of their own; no alias metadata remains for them.

    Example: wsurgery untie model.safetensors -o model.untied.safetensors
    """
    from ..checkpoint import load
    from ..surgery import plan_untie

    c = load(ckpt)
    try:
        p = plan_untie(c, dst or None, device=device)
        return finish_plan(
            "untie", ckpt, p, output, force, in_place, dry_run, json_out, max_shard_size, sync=not no_sync
        )
    finally:
        c.close()
