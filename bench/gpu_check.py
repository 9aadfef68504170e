#!/usr/bin/env python3
"""The GPU check: one prepared run on a CUDA machine, its figures written to one file.

    python bench/gpu_check.py --dry-run                 # what it would run and measure (any machine)
    python bench/gpu_check.py --out gpu-figures.json    # on a CUDA machine: about 6 minutes

It runs, in this order, each step in its own process (so one's GPU memory is not another's):
  1. the GPU tests: the test suite's tests that need CUDA (those skipped without it), and a short
     train_chatgpt_model.py run on the GPU (the starter, LoRA bf16 and QLoRA 4-bit) that must exit 0;
  2. training throughput on the starter, LoRA bf16 and QLoRA 4-bit (nf4), against TRL's SFTTrainer on the
     same generated data and batches, alternating ours and TRL's: tokens/s and peak GPU memory
     (torch.cuda.max_memory_allocated) of each;
  3. bench/quality.py on the GPU (12 invented facts, the sign-off, general answers kept);
and writes every figure, with the GPU's name, torch's and bitsandbytes' versions, to --out.

Each step has a time limit (the whole run stays under 8 minutes); a step that fails or runs out of time is
recorded as such and the next one runs. --dry-run prints the plan of steps and their limits and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEPS = 12  # optimizer steps per throughput run
BATCH = 8
ROUNDS = 2  # alternating rounds of ours and TRL's
KINDS = ("lora-bf16", "qlora-4bit")
LIMITS = {"tests": 80, "train": 35, "throughput": 25, "quality": 110}  # seconds per step (throughput: per run)


def plan() -> list:
    """The steps: (name, limit in seconds, the command) in the order they run."""
    steps = [("tests", LIMITS["tests"], [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "tests"])]
    for kind in KINDS:
        steps.append((f"train-{kind}", LIMITS["train"], [
            sys.executable, str(ROOT / "train_chatgpt_model.py"), "--data", str(ROOT / "example_chatgpt_data.json"),
            "--output", "{work}/" + kind, "--overwrite", "--epochs", "2", "--report", "none", "--rehearsal", "0",
            *(["--load-in-4bit"] if kind == "qlora-4bit" else [])]))
    for round_number in range(ROUNDS):
        for kind in KINDS:
            for side in ("chatkit", "trl"):
                steps.append((f"throughput-{kind}-{side}-{round_number}", LIMITS["throughput"],
                              [sys.executable, __file__, "--child", side, "--kind", kind, "--work", "{work}"]))
    steps.append(("quality", LIMITS["quality"], [sys.executable, str(ROOT / "bench" / "quality.py"), "--json"]))
    return steps


def make_data(path: Path) -> None:
    from train_throughput import make_data as generated  # bench/, this script's folder

    if not path.exists():
        generated(path, STEPS * BATCH)


def child(side: str, kind: str, work: Path) -> dict:
    """One throughput run on the GPU: tokens/s and peak GPU memory."""
    import torch

    from chatkit.output import set_verbosity

    set_verbosity()
    data = work / "throughput.json"
    make_data(data)
    torch.cuda.reset_peak_memory_stats()
    quantized = kind == "qlora-4bit"
    started = time.perf_counter()
    if side == "chatkit":
        from chatkit.options import TrainOptions
        from chatkit.pipeline import train

        options = TrainOptions(data=[str(data)], output=str(work / f"ours-{kind}"), overwrite=True, epochs=1,
                               batch_size=BATCH, val_split=0, logging_steps=1000, max_batch_tokens=BATCH * 1024,
                               rehearsal=0, report="none", load_in_4bit=quantized, device="cuda")
        metrics = train(options)
        tokens, seconds = metrics["tokens_seen"], metrics["train_runtime_s"]
    else:
        from train_throughput import run_trl_on

        tokens, seconds = run_trl_on(data, work / f"trl-{kind}", BATCH, STEPS, device="cuda", quantized=quantized)
    return {"side": side, "kind": kind, "tokens": tokens, "train_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


def machine() -> dict:
    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        found["bitsandbytes"] = None
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return found


def summarise(results: dict) -> dict:
    """Per kind: the best round of each side, and ours over TRL's."""
    summary = {}
    for kind in KINDS:
        best = {}
        for side in ("chatkit", "trl"):
            runs = [r for name, r in results.items()
                    if name.startswith(f"throughput-{kind}-{side}-") and isinstance(r, dict) and "tokens_per_second" in r]
            if runs:
                best[side] = max(runs, key=lambda r: r["tokens_per_second"])
        if len(best) == 2:
            best["chatkit_over_trl"] = round(best["chatkit"]["tokens_per_second"] / best["trl"]["tokens_per_second"], 2)
        summary[kind] = best
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print what it would run and measure, and exit")
    parser.add_argument("--out", default="gpu-figures.json", help="where the figures go (JSON)")
    parser.add_argument("--child", choices=["chatkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.kind, Path(args.work))))
        return 0
    steps = plan()
    if args.dry_run:
        print(f"gpu_check: {len(steps)} steps, at most {sum(limit for _, limit, _ in steps) / 60:.1f} minutes; "
              f"figures to {args.out}")
        for name, limit, command in steps:
            shown = " ".join(part.replace(str(ROOT) + "/", "") for part in command[1:])
            print(f"  {name:<32} up to {limit:>3} s  python {shown}")
        print(f"  measured: tokens/s and peak GPU memory for {', '.join(KINDS)}, ours against TRL SFTTrainer "
              f"({ROUNDS} alternating rounds, {STEPS} steps of {BATCH}); quality.py's recall, sign-off, general answers")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --dry-run shows the plan",
              file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="chatkit-gpu-check-"))
    results = {"machine": machine()}
    started = time.perf_counter()
    for name, limit, command in steps:
        command = [part.replace("{work}", str(work)) for part in command]
        begun = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            entry = {"exit": done.returncode, "seconds": round(time.perf_counter() - begun, 1)}
            if done.returncode == 0 and done.stdout.strip().startswith("{"):
                entry.update(json.loads(done.stdout[done.stdout.index("{"):]))
            if done.returncode != 0 or name == "tests":
                entry["tail"] = (done.stdout + done.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            entry = {"exit": "timed out", "seconds": limit}
        results[name] = entry
        print(f"{name}: {entry.get('exit')} in {entry['seconds']} s", file=sys.stderr, flush=True)
    results["summary"] = summarise(results)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"gpu_check: figures in {args.out} ({results['total_seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
