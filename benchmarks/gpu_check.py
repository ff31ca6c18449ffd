"""wsurgery on a GPU, in one short run (``make gpu-check``): the CUDA-marked tests, the
library on CUDA tensors (load, diff, check, copy, live modules), and a GPU diff benchmark
in GB/s of input against the host-to-device copy bandwidth measured in the same run.

    make gpu-check                                   # 1 GiB pair, results in build/gpu/gpu_check.json
    python benchmarks/gpu_check.py --size 256MiB --out /tmp/gpu.json --skip-tests

Without CUDA (no device, or a CPU build of torch) it writes a JSON that says so and
exits 0: nothing to check here. Exit 1 when a test or a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wsurgery.io.sharded_writer import parse_size  # noqa: E402

SCHEMA = "wsurgery.gpu_check/1"


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nresults written to {out}", file=sys.stderr)


def best_of(fn, rounds: int) -> float:
    """The shortest of ``rounds`` wall times of ``fn()`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def h2d_bandwidth(torch, nbytes: int, rounds: int) -> dict:
    """Host-to-device copies of ``nbytes``: pageable (what a diff of a memory map moves)
    and pinned memory, in GB/s."""
    host = torch.empty(nbytes, dtype=torch.uint8)
    host.fill_(1)
    pinned = host.pin_memory()

    def copy(src):
        def run():
            src.to("cuda", non_blocking=False)
            torch.cuda.synchronize()

        return run

    out = {}
    for label, src in (("pageable", host), ("pinned", pinned)):
        out[label] = round(nbytes / best_of(copy(src), rounds) / 1e9, 2)
    del host, pinned
    torch.cuda.empty_cache()
    return out


def run_tests() -> dict:
    """The CUDA-marked tests (``pytest -m cuda``): counts and the exit code."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", proc.stdout)}
    return {
        "exit_code": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        **counts,
        "tail": proc.stdout.strip().splitlines()[-15:],
    }


def library_checks(torch, work: Path) -> dict:
    """The library on CUDA: load_state_dict to the device, diff / check / copy with
    device="cuda", live modules on the device as inputs."""
    import wsurgery
    from wsurgery.testing import assert_checkpoint_equal

    checks = {}
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.LayerNorm(512), torch.nn.Linear(512, 64))
    path = work / "gpu-model.safetensors"
    wsurgery.save_state_dict(model.state_dict(), path)
    sd = wsurgery.load_state_dict(path, device="cuda")
    checks["load_state_dict_on_cuda"] = all(t.device.type == "cuda" for t in sd.values())
    checks["diff_device_cuda_equal"] = wsurgery.diff(path, path, device="cuda").equal
    gpu = model.cuda()
    checks["diff_live_module_on_cuda_equal"] = wsurgery.diff(gpu, path).equal
    with torch.no_grad():
        gpu[0].weight.mul_(1.001)
    cpu_report = wsurgery.diff({k: v.cpu() for k, v in gpu.state_dict().items()}, path)
    gpu_report = wsurgery.diff(gpu, path, by_module=1)
    (c,), (g,) = cpu_report.changed, gpu_report.changed
    checks["rel_l2_cuda_matches_cpu"] = abs(g.stats.rel_l2 - c.stats.rel_l2) <= 1e-9 * c.stats.rel_l2
    checks["cosine_cuda_matches_cpu"] = abs(g.stats.cosine - c.stats.cosine) <= 1e-9
    checks["thresholds_on_cuda"] = wsurgery.diff(gpu, path, max_rel_l2=1e-2).equal
    assert_checkpoint_equal(gpu, path, max_rel_l2=1e-2)
    checks["assert_checkpoint_equal_on_cuda"] = True
    checks["check_device_cuda"] = wsurgery.check(path, "0.weight", "0.weight", other=path, device="cuda").equal
    with wsurgery.open(path) as ckpt:
        out = ckpt.copy("0.weight", "copy.weight", ["scale(2)"], device="cuda").save(work / "gpu-copy.safetensors")
    scaled = wsurgery.load_state_dict(work / "gpu-copy.safetensors")
    checks["copy_device_cuda"] = out.stored >= 1 and bool(torch.equal(scaled["copy.weight"], scaled["0.weight"] * 2))
    cli = subprocess.run(
        [sys.executable, "-m", "wsurgery", "diff", str(path), str(path), "--device", "cuda", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    checks["cli_diff_device_cuda"] = cli.returncode == 0 and json.loads(cli.stdout)["equal"] is True
    return checks


def diff_benchmark(torch, size: int, dtype: str, work: Path, rounds: int) -> dict:
    """``diff(device="cuda")`` of the every-element-differs pair of ``make bench`` (files in
    the page cache, chunks moved to the GPU), and of the same state dicts already on the
    GPU; GB/s of input (both sides)."""
    import wsurgery
    from benchmarks.bench import make_all_different, make_pair

    a, _ = make_pair(work, size, dtype)
    c = make_all_different(work, size, dtype)
    nbytes = a.stat().st_size + c.stat().st_size
    for p in (a, c):  # into the page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    out = {"dtype": dtype, "bytes": nbytes}
    t = best_of(lambda: wsurgery.diff(a, c, device="cuda"), rounds)
    out["files_device_cuda_s"] = round(t, 3)
    out["files_device_cuda_gb_s"] = round(nbytes / t / 1e9, 2)
    t = best_of(lambda: wsurgery.diff(a, c), rounds)
    out["files_cpu_s"] = round(t, 3)
    out["files_cpu_gb_s"] = round(nbytes / t / 1e9, 2)
    sa = wsurgery.load_state_dict(a, device="cuda")
    sc = wsurgery.load_state_dict(c, device="cuda")
    torch.cuda.synchronize()
    t = best_of(lambda: wsurgery.diff(sa, sc), rounds)
    out["on_device_s"] = round(t, 3)
    out["on_device_gb_s"] = round(nbytes / t / 1e9, 2)
    report = wsurgery.diff(sa, sc, by_module="auto")
    out["changed"] = len(report.changed)
    out["modules"] = len(report.modules or [])
    sa = sc = None  # free the device memory
    torch.cuda.empty_cache()
    for p in (a, c, a.with_name(a.name.replace("a-", "b-", 1))):
        p.unlink(missing_ok=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="checkpoint size of the diff benchmark (default 1GiB)")
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes of the benchmark")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "build" / "gpu" / "gpu_check.json"))
    ap.add_argument("--workdir", default=str(ROOT / "build" / "gpu"))
    ap.add_argument("--skip-tests", action="store_true", help="do not run the CUDA-marked tests")
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"schema": SCHEMA, "python": platform.python_version(), "machine": platform.platform()}
    try:
        import torch
    except ImportError:
        write(out, {**result, "cuda": False, "skipped": "torch is not installed"})
        return 0
    result["torch"] = torch.__version__
    result["torch_cuda"] = torch.version.cuda
    if not torch.cuda.is_available():
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        write(out, {**result, "cuda": False, "skipped": f"{why}: nothing to check on this machine"})
        return 0
    props = torch.cuda.get_device_properties(0)
    result.update(
        cuda=True,
        device={
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "visible": torch.cuda.device_count(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
    )
    t0 = time.perf_counter()
    ok = True
    if not args.skip_tests:
        result["tests"] = run_tests()
        ok &= result["tests"]["exit_code"] == 0
    result["checks"] = library_checks(torch, work)
    ok &= all(result["checks"].values())
    size = parse_size(args.size)
    result["h2d_gb_s"] = h2d_bandwidth(torch, min(size, 1 << 30), args.rounds)
    result["diff"] = []
    for dtype in args.dtype.split(","):
        row = diff_benchmark(torch, size, dtype, work, args.rounds)
        row["files_vs_h2d_pageable"] = round(row["files_device_cuda_gb_s"] / result["h2d_gb_s"]["pageable"], 2)
        result["diff"].append(row)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["ok"] = bool(ok)
    write(out, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
