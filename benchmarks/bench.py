"""wsurgery benchmark: whole-process wall time and peak RSS against the plain scripts a user
would write with torch and safetensors, measured alternately in the same run.

    make bench                       # 1 GiB, float32 and bfloat16
    python benchmarks/bench.py --size 4GiB --dtype float32 --rounds 3
    python benchmarks/bench.py --only diff-all --baseline main   # this tree against main's, in one run

Prints a table (median wall time, peak RSS, ratio to the plain script, GB/s against the
page-cache read rate measured in the same run) and writes the same as JSON
(``build/bench/results.json`` by default). Not collected by ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wsurgery.io.sharded_writer import parse_size  # noqa: E402

PY = sys.executable

PLAIN_DIFF = """
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
worst, same = 0.0, 0
for k in a:
    x, y = a[k], b[k]
    if torch.equal(x, y):
        same += 1
    else:
        worst = max(worst, (x.float() - y.float()).abs().max().item())
print(same, worst)
"""

PLAIN_TIE = """
import sys
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
del sd["projection.weight"]
save_file(sd, sys.argv[2], metadata={"format": "pt", "projection.weight": "embedding.weight"})
"""

PLAIN_CONVERT = """
import sys
from safetensors.torch import load_file, save_file
save_file(load_file(sys.argv[1]), sys.argv[2], metadata={"format": "pt"})
"""

PLAIN_COPY_SCALE = """
import sys
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
sd[sys.argv[4]] = sd[sys.argv[3]] * 0.5
save_file(sd, sys.argv[2], metadata={"format": "pt"})
"""

PLAIN_INSPECT = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    for k in f.keys():
        f.get_slice(k).get_shape()
"""


PLAIN_RECIPE = """
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
sd = {"model." + k: v for k, v in sd.items()}
sd = {k: v for k, v in sd.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) % 5 == 0)}
sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
del sd["model.projection.weight"]
save_file(sd, sys.argv[2], metadata={"format": "pt", "model.projection.weight": "model.embedding.weight"})
"""

# The same job as a recipe; {renames} adds no-op renames in front (a chain costs nothing).
RECIPE = """
version: 1
steps:
{renames}  - rename: {{pattern: '^', to: 'model.'}}
  - drop: ['model.layers.*[05].*']
  - cast: bfloat16
  - tie: {{src: model.embedding.weight, dst: model.projection.weight}}
"""


# DCP -> safetensors, the way torch offers: DCP's own converter to a torch file, then load it and save_file.
PLAIN_DCP_CONVERT = """
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
dcp_to_torch_save(sys.argv[1], sys.argv[2] + ".pt")
sd = torch.load(sys.argv[2] + ".pt", weights_only=True)
save_file(sd, sys.argv[2], metadata={"format": "pt"})
"""


# safetensors -> DCP without a process group, the plain way: load everything, dcp.save it.
PLAIN_DCP_WRITE = """
import sys, warnings
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from safetensors.torch import load_file
warnings.simplefilter("ignore")
dcp.save(load_file(sys.argv[1]), storage_writer=FileSystemWriter(sys.argv[2], sync_files=False))
"""


def make_dcp(a: Path) -> Path:
    """A's tensors as a DCP folder, written by torch.distributed.checkpoint in one process
    (as a training job without a process group writes it), and a byte copy of A: the
    twins its diff is measured against."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    folder = a.with_name(a.name.replace(".safetensors", "-dcp"))
    twin = a.with_name(a.name.replace("a-", "a2-", 1))
    if not (folder / ".metadata").exists():
        shutil.rmtree(folder, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no process group: one process
            dcp.save(load_file(str(a)), checkpoint_id=str(folder))
    if not twin.exists():
        shutil.copyfile(a, twin)
    return folder


def make_megatron(a: Path) -> Path:
    """A's DCP folder as a Megatron-Core ``torch_dist`` folder: the same DCP files (hard
    links), ``metadata.json``, and a ``common.pt`` that holds tensors beside the
    arguments, as training writes it (RNG states, the loss scaler)."""
    import argparse

    import torch

    dcp_folder = make_dcp(a)
    folder = a.with_name(a.name.replace(".safetensors", "-megatron"))
    if (folder / "common.pt").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for f in dcp_folder.iterdir():
        os.link(f, folder / f.name)
    meta = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
            "common_backend_version": 1}  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(meta))
    g = torch.Generator().manual_seed(3)
    common = {
        "args": argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16, tensor_model_parallel_size=1),
        "checkpoint_version": 3.0,
        "iteration": 1000,
        "rng_state": [
            {
                "random_rng_state": torch.randint(0, 255, (5056,), generator=g, dtype=torch.uint8),
                "torch_rng_state": torch.randint(0, 255, (5056,), generator=g, dtype=torch.uint8),
            }
        ],
        "grad_scaler": {"scale": torch.tensor(65536.0), "growth_tracker": torch.tensor(0, dtype=torch.int32)},
    }
    torch.save(common, folder / "common.pt")
    return folder


def recipe_file(folder: Path, renames: int) -> Path:
    path = folder / f"recipe-{renames}.yaml"
    path.write_text(RECIPE.format(renames="  - rename: {pattern: '^(.)', to: '\\1'}\n" * renames))
    return path


def gpt_like(total_bytes: int, dtype: str, seed: int, vocab: int = 32000, dim: int = 2048):
    """A GPT-like state dict of about ``total_bytes``; yields (name, tensor)."""
    import torch

    tdtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=tdtype).element_size()
    g = torch.Generator().manual_seed(seed)
    while vocab * dim * itemsize * 2 > total_bytes / 2 and dim > 64:
        dim //= 2
        vocab //= 2
    per_layer = (4 * dim * dim + 2 * 4 * dim * dim + 2 * dim) * itemsize
    fixed = 2 * vocab * dim * itemsize
    layers = max(1, int((total_bytes - fixed) // per_layer))

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(tdtype)

    yield "embedding.weight", rand(vocab, dim)
    for i in range(layers):
        p = f"layers.{i}"
        yield f"{p}.attn.qkv.weight", rand(3 * dim, dim)
        yield f"{p}.attn.out.weight", rand(dim, dim)
        yield f"{p}.mlp.up.weight", rand(4 * dim, dim)
        yield f"{p}.mlp.down.weight", rand(dim, 4 * dim)
        yield f"{p}.norm1.weight", torch.ones(dim, dtype=tdtype)
        yield f"{p}.norm2.weight", torch.ones(dim, dtype=tdtype)
    yield "projection.weight", rand(vocab, dim)


def make_pair(folder: Path, size: int, dtype: str) -> tuple[Path, Path]:
    a = folder / f"a-{dtype}-{size}.safetensors"
    b = folder / f"b-{dtype}-{size}.safetensors"
    if a.exists() and b.exists():
        return a, b
    from safetensors.torch import save_file

    sd = dict(gpt_like(size, dtype, seed=0))
    save_file(sd, str(a), metadata={"format": "pt"})
    # B differs from A in a few places of a few tensors, as after a short fine-tune
    names = sorted(sd)
    for name in names[:: max(1, len(names) // 5)]:
        t = sd[name].clone()
        flat = t.view(-1)
        flat[:: max(1, flat.numel() // 7)] += 1
        sd[name] = t
    save_file(sd, str(b), metadata={"format": "pt"})
    return a, b


def make_all_different(folder: Path, size: int, dtype: str) -> Path:
    """C: A plus 1e-3 noise in every element of every tensor, as after a full fine-tune."""
    import torch
    from safetensors.torch import save_file

    c = folder / f"c-{dtype}-{size}.safetensors"
    if c.exists():
        return c
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name, t in gpt_like(size, dtype, seed=0):
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        sd[name] = (t.float() + 1e-3 * noise).to(t.dtype)
    save_file(sd, str(c), metadata={"format": "pt"})
    return c


class Ranks(list):
    """A command to run as several ranks (``torchrun``'s environment, over loopback)."""

    def __init__(self, cmd: list[str], world: int):
        super().__init__(cmd)
        self.world = world


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], remove: Path | None = None) -> tuple[float, int, int, float]:
    """Wall seconds, peak RSS in bytes, exit code and CPU seconds (user + system; the
    steadier measure on a machine that others share) of one whole process (``remove``: a
    path deleted first, outside the timing). A :class:`Ranks` command runs as that many
    processes, ranks of one process group on 127.0.0.1: the wall time until the last one
    ends, the largest peak RSS of one rank, the CPU seconds of all."""
    if remove is not None:
        shutil.rmtree(remove) if remove.is_dir() else remove.unlink(missing_ok=True)
    env = dict(os.environ, NO_COLOR="1")
    world = getattr(cmd, "world", 1)
    envs = [env]
    if world > 1:
        port = str(_free_port())
        shared = dict(env, WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo")  # fmt: skip
        envs = [dict(shared, RANK=str(r), LOCAL_RANK=str(r)) for r in range(world)]
    # Start every run with no dirty pages left by the previous one: wsurgery fsyncs its
    # output, and would otherwise also wait for the writeback of the plain script's file.
    os.sync()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e) for e in envs]
    peak, code, cpu = 0, 0, 0.0
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak = max(peak, usage.ru_maxrss * 1024)
        cpu += usage.ru_utime + usage.ru_stime
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.strip()[:500]}")
        code = max(code, proc.returncode)
    wall = time.perf_counter() - t0
    return wall, peak, code, cpu


def page_cache_read_rate(path: Path) -> float:
    """Bytes per second reading a cached file sequentially into one reused buffer.

    The buffer is an anonymous mapping: on this machine class reads into a ``bytearray``
    of the same size ran at 1.7-2.3 GB/s, into a mapping at 7-9 GB/s (as ``dd`` does)."""
    import mmap

    buf = mmap.mmap(-1, 8 << 20)
    view = memoryview(buf)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        best = max(best, total / (time.perf_counter() - t0))
    view.release()
    buf.close()
    return best


def baseline_tree(ref: str, work: Path) -> Path:
    """The ``wsurgery`` package of git revision ``ref``, exported under ``work``, with its
    compare kernel's fused pass compiled where it has one (as its install would)."""
    dest = work / f"baseline-{ref.replace('/', '_')}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "wsurgery"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    subprocess.run([PY, "-m", "compileall", "-q", str(dest)], check=True, stdout=subprocess.DEVNULL)
    if (dest / "wsurgery" / "compare" / "_fused.c").exists():
        sys.path.insert(0, str(ROOT))
        from hatch_build import build_library

        lib, why = build_library(dest)
        if lib is None:
            print(f"note: {ref}'s fused compare pass was not built ({why}); it runs numpy's passes", file=sys.stderr)
    return dest


# the cases whose commands an older revision runs as they are, timed against it by --baseline
SAME_COMMAND_CASES = ("tie-nosync", "convert-nosync", "copy-scale", "inspect", "dcp-convert-nosync", "dcp-diff",
                      "dcp-inspect", "megatron-inspect")  # fmt: skip


def baseline_wanted(name: str, ref: str, only: set[str]) -> bool:
    """Whether the --baseline row ``name`` runs under ``--only``: its case is named, or a
    case of the same command against a limit (``dcp-convert-nosync-vs-cp`` brings
    ``dcp-convert-nosync-vs-REF``)."""
    base = name.removesuffix(f"-vs-{ref}").removesuffix("-by-module")
    return not only or base in only or any(o.startswith(base + "-vs-") for o in only)


def baseline_cases(a: Path, b: Path, out: Path, ref: str, tree: Path):
    """``diff``, ``diff-all`` (and its module rollup), ``tie``/``convert`` without the fsync,
    ``copy-scale``, ``inspect`` and the DCP and Megatron cases of :data:`SAME_COMMAND_CASES`
    of this tree against the same commands of ``ref``: the cost (or gain) of what changed
    since (target: at most 10% slower); and ``ref``'s own ``diff-all-vs-cat`` and
    ``diff-same-vs-cat`` (rows ``NAME@REF``): before and after against their limits in one
    run."""
    ws = [PY, "-m", "wsurgery"]
    theirs = [PY, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); from wsurgery.cli.app import main; main()"]
    for name, ours, _plain, nbytes, _target in cases(a, b, out):
        if name in SAME_COMMAND_CASES:
            yield (f"{name}-vs-{ref}", ours, theirs + ours[len(ws) :], nbytes, 1.10)
    for name, ours, plain, nbytes, target in cases(a, b, out):
        if name in ("diff-all-vs-cat", "diff-same-vs-cat"):  # REF's ratios to the limits, in the same run
            yield (f"{name}@{ref}", theirs + ours[len(ws) :], plain, nbytes, target)
    c = a.with_name(a.name.replace("a-", "c-", 1))
    for name, other in (("diff", b), ("diff-all", c)):
        args = ["diff", str(a), str(other), "--quiet"]
        yield (f"{name}-vs-{ref}", ws + args, theirs + args, 2 * a.stat().st_size, 1.10)
        # the module rollup too (it reads the untouched tensors of changed modules once more)
        yield (
            f"{name}-by-module-vs-{ref}",
            ws + [*args, "--by-module", "2"],
            theirs + args,
            2 * a.stat().st_size,
            1.10,
        )


def cases(a: Path, b: Path, out: Path):
    ws = [PY, "-m", "wsurgery"]
    yield (
        "diff",
        ws + ["diff", str(a), str(b), "--quiet"],
        [PY, "-c", PLAIN_DIFF, str(a), str(b)],
        2 * a.stat().st_size,
        0.25,
    )
    c = a.with_name(a.name.replace("a-", "c-", 1))
    yield (
        "diff-all",
        ws + ["diff", str(a), str(c), "--quiet"],
        [PY, "-c", PLAIN_DIFF, str(a), str(c)],
        2 * a.stat().st_size,
        0.25,
    )
    # The limits of both diffs: reading the two inputs (``cat``), timed alternately in the
    # same run. An every-element diff (a fine-tune against its base) computes exact float64
    # statistics (target 2.5x); an identical pair is screened as raw bytes (target 1.3x).
    twin = a.with_name(a.name.replace("a-", "a2-", 1))
    yield (
        "diff-all-vs-cat",
        ws + ["diff", str(a), str(c), "--quiet"],
        ["cat", str(a), str(c)],
        2 * a.stat().st_size,
        2.5,
    )
    yield (
        "diff-same-vs-cat",
        ws + ["diff", str(a), str(twin), "--quiet"],
        ["cat", str(a), str(twin)],
        2 * a.stat().st_size,
        1.3,
    )
    cmds = {
        "tie": (
            ws + ["tie", str(a), "--src", "embedding.weight", "--dst", "projection.weight", "-o", str(out), "--force"],
            [PY, "-c", PLAIN_TIE, str(a), str(out)],
        ),
        "convert": (ws + ["convert", str(a), "-o", str(out), "--force"], [PY, "-c", PLAIN_CONVERT, str(a), str(out)]),
    }
    for name, (ours, plain) in cmds.items():
        yield (name, ours, plain, a.stat().st_size, 0.5)
    # The plain script leaves its output in the page cache; wsurgery waits for the disk
    # (fsync) unless told not to. Both are measured: the same durability, and the default.
    for name in ("tie", "convert"):
        yield (
            f"{name}-nosync",
            [*cmds[name][0], "--no-sync"],
            cmds[name][1],
            a.stat().st_size,
            0.5,
        )
    # A computed copy over a tensor of the same shape (every gpt_like checkpoint has two
    # layers or more); with --no-sync, as the plain script does not sync either.
    src, dst = "layers.0.mlp.up.weight", "layers.1.mlp.up.weight"
    yield (
        "copy-scale",
        ws + ["copy", str(a), "--src", src, "--dst", dst, "-t", "scale(0.5)", "-o", str(out), "--force", "--no-sync"],
        [PY, "-c", PLAIN_COPY_SCALE, str(a), str(out), src, dst],
        a.stat().st_size,
        0.5,
    )
    # rename every name, drop a fifth of the tensors, cast the rest to bfloat16, tie the head
    for renames, label in ((0, "recipe"), (20, "recipe-20-renames")):
        recipe = recipe_file(out.parent, renames)
        ours = ws + ["apply", str(recipe), str(a), "-o", str(out), "--force"]
        yield (
            f"{label}-nosync",
            [*ours, "--no-sync"],
            [PY, "-c", PLAIN_RECIPE, str(a), str(out)],
            a.stat().st_size,
            0.5,
        )
        if renames == 0:
            yield (label, ours, [PY, "-c", PLAIN_RECIPE, str(a), str(out)], a.stat().st_size, None)
    yield ("inspect", ws + ["inspect", str(a), "--json"], [PY, "-c", PLAIN_INSPECT, str(a)], 0, None)
    # Distributed checkpoints: a DCP folder of A (written by torch), converted to safetensors
    # against torch's own way; diffed against A (its safetensors twin) against a diff of
    # A's byte copy with A; and the every-element-differs diff on 2 ranks against 1.
    folder = a.with_name(a.name.replace(".safetensors", "-dcp"))
    twin = a.with_name(a.name.replace("a-", "a2-", 1))
    dcp_convert = ws + ["convert", str(folder), "-o", str(out), "--force"]
    plain_dcp = [PY, "-c", PLAIN_DCP_CONVERT, str(folder), str(out)]
    yield ("dcp-convert", dcp_convert, plain_dcp, a.stat().st_size, 0.5)
    yield ("dcp-convert-nosync", [*dcp_convert, "--no-sync"], plain_dcp, a.stat().st_size, 0.5)
    # the limit: a copy of the same bytes (contiguous chunks are copied in the kernel)
    yield ("dcp-convert-nosync-vs-cp", [*dcp_convert, "--no-sync"], ["cp", str(a), str(out)], a.stat().st_size, 1.5)
    yield (
        "dcp-diff",
        ws + ["diff", str(folder), str(a), "--quiet"],
        ws + ["diff", str(twin), str(a), "--quiet"],
        2 * a.stat().st_size,
        2.0,
    )
    # metadata only: against inspect of the safetensors twin
    inspect_a = ws + ["inspect", str(a), "--json"]
    yield ("dcp-inspect", ws + ["inspect", str(folder), "--json"], inspect_a, 0, None)
    megatron = a.with_name(a.name.replace(".safetensors", "-megatron"))  # common.pt holds tensors
    yield ("megatron-inspect", ws + ["inspect", str(megatron), "--json"], inspect_a, 0, None)
    written = out.with_name("out-dcp")
    yield (
        "dcp-write-nosync",
        ws + ["convert", str(a), "-o", str(written), "--format", "dcp", "--no-sync"],
        [PY, "-c", PLAIN_DCP_WRITE, str(a), str(written)],
        a.stat().st_size,
        None,
    )
    all_diff = ws + ["diff", str(a), str(c), "--quiet"]
    yield ("diff-all-2-ranks", Ranks(all_diff, 2), all_diff, 2 * a.stat().st_size, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="checkpoint size (default 1GiB)")
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated subset: diff,diff-all,diff-all-vs-cat,diff-same-vs-cat,tie,convert,tie-nosync,"
        "convert-nosync,copy-scale,recipe,recipe-nosync,recipe-20-renames-nosync,inspect,dcp-convert,"
        "dcp-convert-nosync,dcp-convert-nosync-vs-cp,dcp-diff,dcp-inspect,megatron-inspect,dcp-write-nosync,"
        "diff-all-2-ranks,"
        "startup (--version, --help and inspect against python -c pass)",
    )
    ap.add_argument("--workdir", default=str(ROOT / "build" / "bench"))
    ap.add_argument("--json", default=None, help="where to write results (default WORKDIR/results.json)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument(
        "--baseline",
        default=None,
        metavar="REF",
        help="also time diff, diff-all, tie-nosync, convert-nosync, copy-scale, inspect, dcp-convert-nosync, "
        "dcp-diff, dcp-inspect and megatron-inspect against git revision REF's wsurgery (rows NAME-vs-REF, "
        "ratio this / REF)",
    )
    args = ap.parse_args(argv)

    size = parse_size(args.size)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    results = []
    # A real install has byte-compiled modules; don't time compiling them.
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "wsurgery")], check=True, stdout=subprocess.DEVNULL)
    if not only or "startup" in only:  # start-up against the interpreter's own (benchmarks/bench_startup.py)
        from benchmarks.bench_startup import startup_rows

        tree = baseline_tree(args.baseline, work) if args.baseline else None
        results += startup_rows(work, max(args.rounds, 11), tree, args.baseline or "baseline")
        for row in results:
            print(_format_row(row), file=sys.stderr)
    for dtype in ([] if only == {"startup"} else args.dtype.split(",")):
        print(f"generating {args.size} {dtype} checkpoints in {work} ...", file=sys.stderr)
        # in a child process, so this process stays small: a forked child's peak RSS starts at its parent's
        code = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from benchmarks.bench import make_all_different, make_megatron, make_pair; "
            f"from pathlib import Path; a, _ = make_pair(Path({str(work)!r}), {size}, {dtype!r}); "
            f"make_all_different(Path({str(work)!r}), {size}, {dtype!r}); make_megatron(a)"
        )
        subprocess.run([PY, "-c", code], check=True)
        a, b = make_pair(work, size, dtype)
        out = work / "out.safetensors"
        read_rate = page_cache_read_rate(a)
        todo = [c for c in cases(a, b, out) if not only or c[0] in only]
        if args.baseline:
            tree = baseline_tree(args.baseline, work)
            todo += [
                c
                for c in baseline_cases(a, b, out, args.baseline, tree)
                if baseline_wanted(c[0], args.baseline, only) or c[0].split("@")[0] in only
            ]
        for name, ours, plain, nbytes, target in todo:
            # Every run writes a new file: deleting the previous run's output (which on a
            # disk mounted with `discard` costs up to 1 s per GiB) is not part of the work.
            target_path = out.with_name("out-dcp") if name.startswith("dcp-write") else out
            run(ours, remove=target_path)  # warm-up, page cache and imports
            run(plain, remove=target_path)
            mine, theirs = [], []
            for r in range(args.rounds):
                # each side first in turn: on a virtual machine the run after a freed
                # gigabyte can pay for it (docs/performance.md, the copy rows)
                if r % 2:
                    theirs.append(run(plain, remove=target_path))
                    mine.append(run(ours, remove=target_path))
                else:
                    mine.append(run(ours, remove=target_path))
                    theirs.append(run(plain, remove=target_path))
            t_ours = statistics.median(m[0] for m in mine)
            t_plain = statistics.median(m[0] for m in theirs)
            rss_ours = max(m[1] for m in mine)
            rss_plain = max(m[1] for m in theirs)
            row = {
                "command": name,
                "dtype": dtype,
                "size_bytes": a.stat().st_size,
                "wsurgery_s": round(t_ours, 3),
                "plain_s": round(t_plain, 3),
                "ratio": round(t_ours / t_plain, 3),
                "target_ratio": target,
                "wsurgery_rss_mib": round(rss_ours / 2**20, 1),
                "plain_rss_mib": round(rss_plain / 2**20, 1),
                "wsurgery_cpu_s": round(statistics.median(m[3] for m in mine), 3),
                "plain_cpu_s": round(statistics.median(m[3] for m in theirs), 3),
                "wsurgery_gb_s": round(nbytes / t_ours / 1e9, 2) if nbytes else None,
                "page_cache_read_gb_s": round(read_rate / 1e9, 2),
            }
            if name == "inspect":
                row["target_s"] = 0.2
            if name.startswith(("dcp-convert", "dcp-write")):  # convert's target: 300 MiB plus the largest tensor
                row["target_rss_mib"] = round(300 + largest_tensor(a) / 2**20, 1)
            results.append(row)
            print(_format_row(row), file=sys.stderr)
        if not args.keep:
            for p in (a, b, a.with_name(a.name.replace("a-", "c-", 1)), a.with_name(a.name.replace("a-", "a2-", 1)),
                      out, out.with_name(out.name + ".pt")):  # fmt: skip
                p.unlink(missing_ok=True)
            shutil.rmtree(a.with_name(a.name.replace(".safetensors", "-dcp")), ignore_errors=True)
            shutil.rmtree(a.with_name(a.name.replace(".safetensors", "-megatron")), ignore_errors=True)
            shutil.rmtree(out.with_name("out-dcp"), ignore_errors=True)
    report = {
        "schema": "wsurgery.bench/1",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "rounds": args.rounds,
        "results": results,
    }
    dest = Path(args.json) if args.json else work / "results.json"
    dest.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results))
    print(f"\nresults written to {dest}")
    if not args.keep:
        shutil.rmtree(work / "tmp", ignore_errors=True)
    return 0


def largest_tensor(path: Path) -> int:
    """The bytes of the largest tensor of a safetensors file (from its header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return max(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def _format_row(r) -> str:
    return (
        f"  {r['command']:14} {r['dtype']:9} wsurgery {r['wsurgery_s']:7.3f}s  plain {r['plain_s']:7.3f}s  "
        f"ratio {r['ratio']:.3f}  cpu {r['wsurgery_cpu_s']:.3f} vs {r['plain_cpu_s']:.3f} s  "
        f"rss {r['wsurgery_rss_mib']:.0f} vs {r['plain_rss_mib']:.0f} MiB"
    )


def _table(rows) -> str:
    head = (
        "| command | dtype | size | wsurgery s | plain s | ratio (target) | wsurgery RSS MiB | plain RSS MiB "
        "| wsurgery GB/s | page-cache read GB/s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        target = r.get("target_ratio")
        tgt = f"<= {target}" if target else (f"<= {r['target_s']} s" if r.get("target_s") else "reported")
        lines.append(
            f"| {r['command']} | {r['dtype']} | {r['size_bytes'] / 2**30:.2f} GiB | {r['wsurgery_s']} | {r['plain_s']} "
            f"| {r['ratio']} ({tgt}) | {r['wsurgery_rss_mib']} | {r['plain_rss_mib']} | {r['wsurgery_gb_s'] or '-'} "
            f"| {r['page_cache_read_gb_s']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
