#!/usr/bin/env python3
"""The focus stage alone: trained again from where a budget run's conversations left the model, with variants.

    python bench/budget_selection.py --data pk2023.jsonl --budgets 30m --rules surprise --no-starter
    python bench/focus_stage.py --work WORK                          # the focus stage as the toolkit trains it
    python bench/focus_stage.py --work WORK --repeats 16             # each exchange 16 times
    python bench/focus_stage.py --work WORK --lr-scheduler constant_with_warmup
    python bench/focus_stage.py --work WORK --no-rehearsal
    python bench/focus_stage.py --work WORK --measure WORK/surprise-30m   # only measure a trained model

WORK is the folder budget_selection.py printed ("work"): its planted export and the surprise run's output,
whose checkpoints hold the model after the conversations and the rehearsal's answers. The focus exchanges
are chosen as the run chose them (from the reading it cached), the rehearsal's examples go with them, and
the stage is trained as focus.py trains it (steps of 3, its own schedule and optimizer, no deadline), so a
variant's figures differ from the run's by the variant alone and by the order of the examples. Each
variant takes a few minutes where a whole run takes the budget. Measured as budget_selection.py
measures (held-out loss only with --held-out). Prints JSON; the results are in docs/PERFORMANCE.md
("Choosing what a budget trains").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from budget_selection import Yardsticks, planted_export  # the bench beside this one


def conversations_checkpoint(run: Path) -> Path:
    """The run's last checkpoint of the conversations (the focus stage's are in their own folder)."""
    found = [(int(m.group(1)), path) for path in (run / "checkpoints").glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", path.name))]
    if not found:
        raise SystemExit(f"{run}/checkpoints has no checkpoint of the conversations")
    return max(found)[1]


def focus_examples(conversations: list, train_indices: list, tokenizer, max_length: int) -> list:
    """The focus exchanges' examples, as planning.choose_focus orders them from the cached reading."""
    from chatkit import selection
    from chatkit.models import resolve_model
    from chatkit.options import STARTER_MODEL

    units, owners = selection.exchange_units([conversations[i] for i in train_indices])
    cache = selection.ScoreCache(selection.model_key(resolve_model(STARTER_MODEL)))
    words = selection.recurring(units, owners, cache, selection.Vocabulary(tokenizer))
    return selection.focus_examples(units, words, selection.near_duplicates(units), tokenizer, max_length)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="the folder budget_selection.py printed")
    parser.add_argument("--run", default="surprise-30m", help="the surprise run's output, in WORK")
    parser.add_argument("--exchanges", type=int, default=None, help="default: as many as the run's plan trained")
    parser.add_argument("--repeats", type=int, default=None, help="default: as many as the run's plan gave")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--no-rehearsal", action="store_true", help="without the rehearsal's examples")
    parser.add_argument("--held-out", action="store_true", help="measure the held-out loss too (a few minutes)")
    parser.add_argument("--measure", help="only measure this trained model")
    parser.add_argument("--output", help="where the model goes (default: WORK/focus-<variant>)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from chatkit.models import load_model, load_tokenizer, resolve_model
    from chatkit.options import STARTER_MODEL
    from chatkit.output import set_verbosity

    set_verbosity()
    work, run = Path(args.work), Path(args.work) / args.run
    conversations, train_indices, val_indices, facts, _ = planted_export(str(work / "planted.jsonl"), 12, 4, args.seed)
    tokenizer = load_tokenizer(resolve_model(STARTER_MODEL))
    yardsticks = Yardsticks.make(conversations, val_indices, facts, tokenizer, args.max_length)
    if args.measure:
        print(json.dumps({args.measure: yardsticks.measure(args.measure, held_out=args.held_out)}))
        return 0

    from types import SimpleNamespace

    from chatkit.engine import ChatTrainingArguments, run_trainer
    from chatkit.plan import FOCUS_BATCH
    from chatkit.rehearsal import Rehearsal
    from chatkit.rundata import prepare_examples

    plan = json.loads((run / "chatkit.json").read_text())["plan"]
    count = plan["focus_exchanges"] if args.exchanges is None else args.exchanges
    repeats = plan["focus_repeats"] if args.repeats is None else args.repeats
    chosen = focus_examples(conversations, train_indices, tokenizer, args.max_length)[:count]
    saved = run / "checkpoints" / "rehearsal.json"
    answers = [] if args.no_rehearsal or not saved.is_file() else json.loads(saved.read_text())["conversations"]
    # as the run prepared them: the focus repeated, the rehearsal's examples once with the base model as teacher
    options = SimpleNamespace(system_prompt=None, train_on_prompt=False, packing=False)
    base = load_model(STARTER_MODEL).model.eval() if answers else None
    prepared = prepare_examples(SimpleNamespace(options=options, max_length=args.max_length, focus_copies=repeats),
                                base, tokenizer, SimpleNamespace(train=[], val=[], focus=chosen),
                                Rehearsal(conversations=answers, asked=len(answers)))
    del base
    examples, teacher = prepared.focus, prepared.teacher
    variant = f"{len(chosen)}x{repeats}-{args.lr_scheduler}-{args.learning_rate:g}" + ("-alone" if args.no_rehearsal else "")
    output = Path(args.output or work / f"focus-{variant}")
    model = load_model(str(conversations_checkpoint(run)), adapter_trainable=True).model
    arguments = ChatTrainingArguments.for_run(
        checkpoints_dir=str(output / "checkpoints"), epochs=1, batch_size=FOCUS_BATCH, learning_rate=args.learning_rate,
        device="cpu", dtype="float32", has_val=False, lr_scheduler=args.lr_scheduler, seed=args.seed,
        max_batch_tokens=args.max_length)
    started = time.perf_counter()
    result = run_trainer(model, tokenizer, examples, [], arguments, teacher=teacher)
    seconds, steps = time.perf_counter() - started, result.trainer.state.global_step
    result.trainer.model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    del model, result
    figures = {"exchanges": len(chosen), "repeats": repeats, "examples": len(examples),
               "steps": steps, "train_s": round(seconds)}
    print(json.dumps({variant: figures | yardsticks.measure(str(output), held_out=args.held_out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
