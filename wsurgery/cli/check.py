"""wsurgery check: assert transform(SRC) == DST within tolerance (exit 0 equal, 1 different)."""

from __future__ import annotations

from ..transforms import chain_text
from ._errors import command
from .common import (
    CheckDstOpt,
    CheckFromOpt,
    CheckSrcOpt,
    CkptArg,
    CompareDeviceOpt,
    JsonOpt,
    QuietOpt,
    TransformOpt,
    console,
    safe,
)
from .diff import (
    ProgressBar,
    compare_options,
    criteria_text,
    fmt_float,
    machine_output,
    single_threaded_blas,
    stats_table,
)
from .options import Tolerances, tolerance_options


@command("check")
@tolerance_options()
def check(
    ckpt: CkptArg,
    src: CheckSrcOpt,
    dst: CheckDstOpt,
    transform: TransformOpt = None,
    other: CheckFromOpt = None,
    device: CompareDeviceOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    tol: Tolerances,
) -> int:
    """Assert that transform(SRC) equals DST, in CKPT or with DST taken from --from.

    Module prefixes check every pair under them. A pair differs when shapes or dtypes differ
    or its values are not equal by every stated criterion: each element within tolerance
    (|a - b| <= atol + rtol * |b|), --max-rel-l2, --min-cosine. Exit 0 when every pair is
    equal, 1 when one differs.

    Example: wsurgery check model.safetensors --src embedding.weight --dst lm_head.weight -t transpose
    """
    single_threaded_blas()
    from ..compare import check as run_check

    with ProgressBar("check", enabled=not (json_out or quiet)) as bar:
        report = run_check(
            ckpt,
            src,
            dst,
            transform=transform or [],
            other=other,
            **compare_options(tol, device=device, progress=bar),
        )
    code = 0 if report.equal else 1
    if machine_output(report, quiet=quiet, json_out=json_out):
        return code
    con = console(rich=True)
    what = safe(f"{chain_text(report.transform)}({src}) vs {dst}" + (f" in {other}" if other else ""))
    said = criteria_text(report)
    n = len(report.pairs)
    pairs = f"{n} pair" + ("" if n == 1 else "s")
    drift = f", rel l2 {fmt_float(report.rel_l2)}" if report.rel_l2 else ""
    if report.equal:
        con.print(f"equal: {what}: {pairs}, {report.numel or 0:,} elements{drift} ({said})", markup=False)
        return code
    bad = [p for p in report.pairs if not p.equal]
    con.print(
        f"different: {what}: {len(bad)} of {pairs} differ; mismatched "
        f"{report.mismatched if report.mismatched is not None else '-'}, max |a-b| "
        f"{fmt_float(report.max_abs_diff)}{drift} ({said})",
        markup=False,
    )
    bad.sort(key=lambda p: p.severity())
    rows = [(f"{p.src} -> {p.dst}", p.reason, p.src_info, p.dst_info, p.stats) for p in bad]
    con.print(stats_table(rows, "src -> dst", "transform(src) | dst"))
    return code
