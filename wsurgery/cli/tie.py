"""wsurgery tie: make DST an alias of transform(SRC), stored once."""

from __future__ import annotations

from ._errors import command
from .common import (
    CkptArg,
    DryRunOpt,
    DstOpt,
    ForceOpt,
    InPlaceOpt,
    JsonOpt,
    MaxShardOpt,
    NoSyncOpt,
    OutOpt,
    SrcOpt,
    TransformOpt,
)
from .output import finish_plan


@command("tie")
def tie(
    ckpt: CkptArg,
    src: SrcOpt,
    dst: DstOpt,
    transform: TransformOpt = None,
    output: OutOpt = None,
    force: ForceOpt = False,
    in_place: InPlaceOpt = False,
    dry_run: DryRunOpt = False,
    max_shard_size: MaxShardOpt = None,
    no_sync: NoSyncOpt = False,
    json_out: JsonOpt = False,
) -> int:
    """Tie DST to SRC: store SRC once and record DST as its alias (view steps only: same, transpose,
    permute, reshape, slice). An alias as SRC resolves to its stored source, the chains composed.

    Example: wsurgery tie model.pt --src embedding.weight --dst projection.weight
    """
    from ..checkpoint import load
    from ..surgery import plan_tie

    c = load(ckpt)
    try:
        p = plan_tie(c, src, dst, transform or [])
        return finish_plan("tie", ckpt, p, output, force, in_place, dry_run, json_out, max_shard_size, sync=not no_sync)
    finally:
        c.close()
