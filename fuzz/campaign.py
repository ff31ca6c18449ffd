"""The long fuzzing campaign: the property targets of tests/fuzz/test_formats.py, for minutes.

    python fuzz/campaign.py --minutes 10
    python fuzz/campaign.py --examples 20000 --target structural_pickles

Round-robin over the targets, each round a fresh random hypothesis run of ``--chunk``
examples, until the time or example budget is spent. A finding is any outcome other
than a loaded checkpoint or a one-line wsurgery error: another exception, a hang (the
per-input watchdog), a MemoryError under the address-space limit set here, or a marker
file created by a pickle. Hypothesis shrinks each finding and prints its minimal input.

The hostile targets (``hostile_pickles``, ``hostile_safetensors``,
``reserved_names_round_trip``) build the known bombs at full size (memo and stack
growth, copying calls, shared containers, long names, colliding keys, views larger than
their storage, huge and many dims, reserved metadata keys, long alias chains): the
address-space limit (4 GiB by default) makes a bomb that comes back a MemoryError finding
rather than the machine's swap or its OOM killer.

Prints how many inputs it tried and every finding; exits 1 if there was one.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _limit_memory(gib: float) -> None:
    """Cap the address space, so a memory bomb is a MemoryError finding, not the OOM killer."""
    limit = int(gib * (1 << 30))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="run for this long (default 5 when no budget is given)")
    budget.add_argument("--examples", type=int, help="stop after this many inputs")
    parser.add_argument("--target", action="append", help="only these targets (repeatable); default: all")
    parser.add_argument("--chunk", type=int, default=250, help="examples per target per round (default 250)")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="address-space limit (default 4 GiB)")
    parser.add_argument("--max-findings", type=int, default=10, help="stop after this many findings")
    args = parser.parse_args(argv)
    if args.minutes is None and args.examples is None:
        args.minutes = 5.0

    os.environ.setdefault("NO_COLOR", "1")
    from hypothesis import settings

    import tests.fuzz.test_formats as fuzz
    from fuzz.distributed import TARGETS as DISTRIBUTED_TARGETS

    fuzz.TARGETS.update(DISTRIBUTED_TARGETS)  # DCP, Megatron and .nemo layouts (fuzz/distributed.py)
    from fuzz.recipes import TARGETS as RECIPE_TARGETS

    fuzz.TARGETS.update(RECIPE_TARGETS)  # recipes: YAML, rename patterns, integers (fuzz/recipes.py)
    from fuzz.tensors import TARGETS as TENSOR_TARGETS

    fuzz.TARGETS.update(TENSOR_TARGETS)  # in-memory tensors of every kind to diff/check (fuzz/tensors.py)

    names = args.target or list(fuzz.TARGETS)
    unknown = [n for n in names if n not in fuzz.TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; known: {', '.join(fuzz.TARGETS)}")
    _limit_memory(args.memory_gib)

    base = settings.get_profile("wsurgery-campaign")
    start = time.monotonic()
    deadline = start + args.minutes * 60 if args.minutes is not None else None
    per_target = {n: 0 for n in names}
    findings: list[str] = []
    active = list(names)
    rounds = 0
    print(f"wsurgery fuzz campaign: targets {', '.join(names)}; budget "
          f"{f'{args.minutes:g} min' if deadline else f'{args.examples} inputs'}", flush=True)  # fmt: skip

    def spent() -> bool:
        if deadline is not None and time.monotonic() >= deadline:
            return True
        return args.examples is not None and fuzz.TRIED["inputs"] >= args.examples

    while active and not spent() and len(findings) < args.max_findings:
        rounds += 1
        for name in list(active):
            if spent():
                break
            chunk = args.chunk
            if args.examples is not None:
                chunk = max(1, min(chunk, args.examples - fuzz.TRIED["inputs"]))
            before = fuzz.TRIED["inputs"]
            test = fuzz.property_test(name, settings(base, max_examples=chunk))
            try:
                test()
            except KeyboardInterrupt:
                active = []
                break
            except BaseException as exc:  # noqa: BLE001 - every failure is a finding to report
                tb = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                findings.append(f"[{name}] {tb}")
                print(f"FINDING in {name}:\n{traceback.format_exc()}", flush=True)
                active.remove(name)  # one shrunk finding per target is enough to act on
            per_target[name] += fuzz.TRIED["inputs"] - before
        elapsed = time.monotonic() - start
        print(
            f"  round {rounds}: {fuzz.TRIED['inputs']} inputs "
            f"({fuzz.TRIED['loaded']} loaded, {fuzz.TRIED['refused']} refused) in {elapsed:.0f} s",
            flush=True,
        )

    elapsed = time.monotonic() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(f"inputs tried: {fuzz.TRIED['inputs']}")
    print(f"  loaded: {fuzz.TRIED['loaded']}, refused with a wsurgery error: {fuzz.TRIED['refused']}")
    print("  per target: " + ", ".join(f"{n} {c}" for n, c in per_target.items()))
    print(f"  time: {elapsed:.0f} s, peak RSS: {peak_mib:.0f} MiB")
    print(f"findings: {len(findings)}")
    for f in findings:
        print(f"  {f}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
