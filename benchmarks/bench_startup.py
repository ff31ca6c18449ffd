"""wsurgery start-up: ``--version``, ``--help`` and ``inspect`` of a small safetensors file,
each against ``python -c pass`` measured alternately in the same run (the interpreter's own
start-up is the limit). Targets: ``--version`` and ``--help`` <= 3x, ``inspect`` <= 5x.

    python benchmarks/bench_startup.py --rounds 21
    python benchmarks/bench_startup.py --rounds 21 --baseline main   # and main's, in the same run
    make bench BENCH_ARGS="--only startup"

The commands run as the console script does (``from wsurgery.cli.app import main; main()``),
byte-compiled, CPU only. Medians; the machine may be shared, so read ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# case -> (arguments, target ratio to `python -c pass`)
CASES = {
    "startup-version": (["--version"], 3.0),
    "startup-help": (["--help"], 3.0),
    "startup-inspect": (["inspect", "{file}"], 5.0),
}


def small_safetensors(path: Path) -> Path:
    """A 16-tensor float32 safetensors file, written by hand (no torch needed)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for i in range(16):
        header[f"layers.{i}.weight"] = {"dtype": "F32", "shape": [8, 8], "data_offsets": [offset, offset + 256]}
        offset += 256
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))
    return path


def _console_script(tree: Path) -> list[str]:
    return [PY, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); from wsurgery.cli.app import main; main()"]


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def startup_rows(work: Path, rounds: int = 21, baseline: Path | None = None, label: str = "baseline") -> list[dict]:
    """Each case of this tree (and of ``baseline``'s, when given) against ``python -c pass``,
    every command once per round, in turn: the rows ``make bench`` prints."""
    work.mkdir(parents=True, exist_ok=True)
    file = small_safetensors(work / "startup.safetensors")
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "wsurgery")], check=True, stdout=subprocess.DEVNULL)
    trees = {"": ROOT, **({f"-{label}": baseline} if baseline is not None else {})}
    commands: dict[str, list[str]] = {"pass": [PY, "-c", "pass"]}
    for suffix, tree in trees.items():
        for case, (args, _) in CASES.items():
            commands[case + suffix] = _console_script(tree) + [a.format(file=file) for a in args]
    for cmd in commands.values():  # warm-up: page cache and byte-compiled files
        _time(cmd)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, cmd in commands.items():
            times[name].append(_time(cmd))
    plain = statistics.median(times["pass"])
    rows = []
    for name in commands:
        if name == "pass":
            continue
        base = name.split("-" + label)[0] if baseline is not None else name
        ours = statistics.median(times[name])
        rows.append(
            {
                "command": name,
                "dtype": "-",
                "size_bytes": file.stat().st_size,
                "wsurgery_s": round(ours, 4),
                "plain_s": round(plain, 4),
                "ratio": round(ours / plain, 2),
                "target_ratio": CASES[base][1],
                "wsurgery_rss_mib": 0.0,
                "plain_rss_mib": 0.0,
                "wsurgery_cpu_s": 0.0,
                "plain_cpu_s": 0.0,
                "wsurgery_gb_s": None,
                "page_cache_read_gb_s": 0.0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--workdir", default=str(ROOT / "build" / "bench"))
    ap.add_argument("--baseline", default=None, metavar="REF", help="also time git revision REF's wsurgery")
    args = ap.parse_args(argv)
    tree = None
    if args.baseline:
        sys.path.insert(0, str(ROOT))
        from benchmarks.bench import baseline_tree

        tree = baseline_tree(args.baseline, Path(args.workdir))
    rows = startup_rows(Path(args.workdir), args.rounds, tree, args.baseline or "baseline")
    print("| case | wsurgery s | python -c pass s | ratio (target) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['wsurgery_s']} | {r['plain_s']} | {r['ratio']}x (<= {r['target_ratio']}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
