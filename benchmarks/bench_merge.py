"""Merge benchmarks: whole-process wall time and peak RSS of ``wsurgery merge`` and
``wsurgery merge-lora`` against the plain scripts a user would write.

    python benchmarks/bench_merge.py                    # 1 GiB checkpoints
    python benchmarks/bench_merge.py --size 256MiB      # a smaller run on a shared machine

- mean of three checkpoints vs loading all three with safetensors, sum, divide, save_file;
- a rank-16 LoRA of every linear layer folded into a Llama-like model folder vs PEFT's
  ``merge_and_unload`` + ``save_pretrained``.

Targets: wall time <= 0.5x the plain script, peak RSS <= 300 MiB + one tensor per input.
Writes ``build/bench/merge.json``. Not collected by ``make test``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import PY, gpt_like, run  # noqa: E402
from wsurgery.io.sharded_writer import parse_size  # noqa: E402

PLAIN_MEAN = """
import sys
from safetensors.torch import load_file, save_file
sds = [load_file(p) for p in sys.argv[1:-1]]
out = {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}
save_file(out, sys.argv[-1], metadata={"format": "pt"})
"""

PLAIN_LORA = """
import sys
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
merged = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
merged.save_pretrained(sys.argv[3])
"""


def make_three(folder: Path, size: int, dtype: str) -> list[Path]:
    from safetensors.torch import save_file

    paths = []
    for i in range(3):
        p = folder / f"avg{i}-{dtype}-{size}.safetensors"
        if not p.exists():
            save_file(dict(gpt_like(size, dtype, seed=i)), str(p), metadata={"format": "pt"})
        paths.append(p)
    return paths


def make_lora(folder: Path, size: int) -> tuple[Path, Path]:
    """A Llama-like float32 model folder of about ``size`` bytes and a rank-16 LoRA of every
    linear layer (random, non-zero B)."""
    import peft
    import torch
    import transformers

    base, adapter = folder / f"llama-{size}", folder / f"lora-{size}"
    if base.exists() and adapter.exists():
        return base, adapter
    hidden, inter, vocab = 1024, 2816, 8192
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4
    layers = max(1, int((size - 2 * vocab * hidden * 4) // per_layer))
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    pm.save_pretrained(adapter)
    return base, adapter


def largest(path: Path) -> int:
    import wsurgery

    with wsurgery.open(path) as c:
        return max(s.nbytes for s in c.stored.values())


def measure(cmd, out: Path, rounds: int) -> tuple[float, int, float]:
    """Median wall seconds, largest peak RSS, median CPU seconds (the steadier figure on a
    shared machine)."""
    walls, peaks, cpus = [], [], []
    for _ in range(rounds):
        wall, peak, _, cpu = run(cmd, remove=out)
        walls.append(wall)
        peaks.append(peak)
        cpus.append(cpu)
    return statistics.median(walls), max(peaks), statistics.median(cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "build" / "bench"))
    ap.add_argument("--only", choices=["mean", "lora"], default=None)
    ap.add_argument("--make", choices=["mean", "lora"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.make:  # in a child process: a forked child's peak RSS starts at its parent's
        make_three(work, size, args.dtype) if args.make == "mean" else make_lora(work, size)
        return 0
    for what in [args.only] if args.only else ["mean", "lora"]:
        subprocess.run([PY, __file__, "--make", what, "--size", args.size, "--dtype", args.dtype, "--work", str(work)],
                       check=True)  # fmt: skip
    ws = [PY, "-m", "wsurgery"]
    rows = []
    if args.only in (None, "mean"):
        paths = make_three(work, size, args.dtype)
        out = work / "merged.safetensors"
        ours = measure([*ws, "merge", *map(str, paths), "-o", str(out), "--force", "--no-sync"], out, args.rounds)
        plain = measure([PY, "-c", PLAIN_MEAN, *map(str, paths), str(out)], out, args.rounds)
        rows.append(("mean of 3", ours, plain, 300 + 3 * largest(paths[0]) / 2**20))
    if args.only in (None, "lora"):
        base, adapter = make_lora(work, size)
        out = work / "merged-lora"
        ours = measure(
            [*ws, "merge-lora", str(base), str(adapter), "-o", str(out), "--force", "--no-sync"], out, args.rounds
        )
        plain = measure([PY, "-c", PLAIN_LORA, str(base), str(adapter), str(out)], out, args.rounds)
        rows.append(("merge-lora r16 all-linear", ours, plain, 300 + 2 * largest(base) / 2**20))
    report = []
    print(
        f"| case ({args.size}, {args.dtype}) | wsurgery s | plain s | ratio (target 0.5) "
        "| wsurgery RSS MiB | plain RSS MiB | RSS target MiB | wsurgery CPU s | plain CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (w1, r1, c1), (w2, r2, c2), target in rows:
        ratio = w1 / w2
        report.append(
            {
                "case": name,
                "size": args.size,
                "wsurgery_s": round(w1, 2),
                "plain_s": round(w2, 2),
                "ratio": round(ratio, 2),
                "wsurgery_rss_mib": round(r1 / 2**20),
                "plain_rss_mib": round(r2 / 2**20),
                "target_rss_mib": round(target),
                "wsurgery_cpu_s": round(c1, 2),
                "plain_cpu_s": round(c2, 2),
            }
        )
        print(
            f"| {name} | {w1:.2f} | {w2:.2f} | {ratio:.2f} | {r1 / 2**20:.0f} | {r2 / 2**20:.0f} | {target:.0f} "
            f"| {c1:.2f} | {c2:.2f} |"
        )
    (work / "merge.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
