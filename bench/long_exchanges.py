#!/usr/bin/env python3
"""Exchanges longer than --max-length: trained on their first part, or left out?

    python bench/long_exchanges.py --data pk2023.jsonl --budget 5m

Trains the same data twice with the same command (`train_chatgpt_model.py --data DATA --time-budget
BUDGET --report none`, a fresh process each): once as the toolkit does (an exchange too long on its own
is cut at --max-length and its answer's first part trained, with no end of turn at the cut), once with
such exchanges left out (as before). Both runs hold out the same validation conversations (the split
is seeded and made before tokenizing). Then the starter and both models are measured on them, the
loss per trained token:

- on the held-out exchanges that fit --max-length (what both runs could have trained on), and
- on the first --max-length tokens of the held-out exchanges that do not (long answers' openings).

Prints JSON; the results are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
# The variant that leaves long exchanges out, as the trainer did before they were cut.
LEAVE_OUT = ("import sys, runpy; from chatkit import examples; examples.first_part = lambda *args: None; "
             "sys.argv = sys.argv[1:]; runpy.run_path('train_chatgpt_model.py', run_name='__main__')")


def run_trainer(flags: list, patch: Optional[str], what: str) -> Tuple[float, str]:
    """train_chatgpt_model.py with `flags` in a fresh process, as it is or with `patch` (Python code that
    changes the toolkit, then runs the script): its seconds and what it said on stderr."""
    command = ([sys.executable, "train_chatgpt_model.py", *flags] if patch is None else
               [sys.executable, "-c", patch, "train_chatgpt_model.py", *flags])
    started = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if process.returncode != 0:
        sys.stderr.write(process.stderr)
        raise SystemExit(f"{what}: the training run failed")
    return time.perf_counter() - started, process.stderr


def train(variant: str, data: str, budget: str, output: Path, extra: list) -> dict:
    flags = ["--data", data, "--output", str(output), "--time-budget", budget, "--report", "none", *extra]
    seconds, said = run_trainer(flags, None if variant == "cut" else LEAVE_OUT, variant)
    lines = [line for line in said.splitlines() if line.startswith(("plan:", "training on"))]
    return {"seconds": round(seconds, 1), "said": lines}


def held_out(data: str, tokenizer, max_length: int, seed: int):
    """The validation conversations both runs held out, as (exchanges that fit, first parts of those that do not)."""
    from chatkit.datasets import default_val_split, read_conversations, split_train_val
    from chatkit.examples import first_part
    from chatkit.formatting import split_exchanges, tokenize_conversation

    conversations, _ = read_conversations([data])
    _, val = split_train_val(conversations, default_val_split(len(conversations)), seed)
    fits, cut = [], []
    for messages in val:
        system, exchanges = split_exchanges(messages)
        for exchange in exchanges:
            ids, labels = tokenize_conversation(([system] if system else []) + exchange, tokenizer)
            if len(ids) <= max_length:
                fits.append({"input_ids": ids, "labels": labels})
            elif (part := first_part(ids, labels, max_length)) is not None:
                cut.append({"input_ids": part[0], "labels": part[1]})
    return fits, cut


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from chatkit.models import load_model, load_tokenizer, resolve_model
    from chatkit.options import STARTER_MODEL
    from chatkit.output import set_verbosity
    from chatkit.report import mean_loss

    set_verbosity()
    work = Path(tempfile.mkdtemp(prefix="chatkit-long-"))
    extra = ["--max-length", str(args.max_length), "--seed", str(args.seed)]
    runs = {variant: train(variant, args.data, args.budget, work / variant, extra) for variant in ("cut", "left out")}
    tokenizer = load_tokenizer(resolve_model(STARTER_MODEL))
    fits, cut = held_out(args.data, tokenizer, args.max_length, args.seed)
    losses = {}
    for name, model in (("starter", STARTER_MODEL), ("cut", str(work / "cut")), ("left out", str(work / "left out"))):
        loaded = load_model(model).model
        losses[name] = {"exchanges that fit": round(mean_loss(loaded, fits), 4),
                        "first parts of long ones": round(mean_loss(loaded, cut), 4) if cut else None}
        del loaded
    print(json.dumps({"budget": args.budget, "held_out": {"exchanges that fit": len(fits),
                                                          "long exchanges": len(cut)},
                      "validation_loss": losses, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
