"""The focus stage of a run a time budget shortened: after the conversations, the exchanges that hold what the
base model does not know of the user's world (selection.py), several times each, with a learning-rate
schedule and an optimizer of its own. Mixed among the conversations the same repeats taught no fact: the
conversations' steps washed them out (docs/PERFORMANCE.md, "Choosing what a budget trains").

What the conversations taught is held the way rehearsal holds general knowledge: the openings of a few
of the conversations just trained go with the focus, trained towards the model's own predictions as
the conversations left them, so they pull back only where the short focus answers move it away.

Imported only when training runs: it imports the engine, which imports torch.
"""

from __future__ import annotations

from pathlib import Path

from .budget import focus_deadline
from .engine import ChatTrainingArguments, RunResult, run_trainer
from .output import say
from .plan import FOCUS_ANCHOR_TOKENS, FOCUS_ANCHORS, FOCUS_BATCH
from .runfolder import CHECKPOINTS, RUNS

FOCUS_FOLDER = "focus"  # the stage's checkpoints and logs, beside the run's


def anchors(model, prepared, seed: int):
    """The openings of up to FOCUS_ANCHORS trained conversations (FOCUS_ANCHOR_TOKENS each: about 4,000 tokens,
    a few per cent of a focus stage's), with the model's predictions on them as their teacher; the stage's
    teacher (the rehearsal's table and theirs)."""
    import random

    from .formatting import IGNORE_INDEX
    from .rehearsal import attach_teacher

    conversations = [e for e in prepared.train if max(e.get("teacher_index") or [-1]) < 0]  # not rehearsal's
    chosen = random.Random(seed).sample(conversations, min(FOCUS_ANCHORS, len(conversations)))
    cut = [{"input_ids": e["input_ids"][:FOCUS_ANCHOR_TOKENS], "labels": e["labels"][:FOCUS_ANCHOR_TOKENS],
            "length": min(len(e["input_ids"]), FOCUS_ANCHOR_TOKENS)} for e in chosen]
    cut = [e for e in cut if any(label != IGNORE_INDEX for label in e["labels"])]
    if not cut:
        return [], prepared.teacher
    rows = len(prepared.teacher.ids) if prepared.teacher is not None else 0
    table = attach_teacher(model, cut, start=rows)
    return cut, prepared.teacher.joined(table) if prepared.teacher is not None else table


def learn_focus(run, placement, tokenizer, prepared, deadline, first: RunResult) -> RunResult:
    """Train the focus stage on the model the conversations left (`first`); the run's result with both stages'
    figures and loss history. Ctrl-C keeps the model with the focus steps taken, as it keeps DPO's."""
    options = run.options
    output = Path(options.output)
    arguments = ChatTrainingArguments.for_run(
        checkpoints_dir=str(output / CHECKPOINTS / FOCUS_FOLDER), logs_dir=str(output / RUNS / FOCUS_FOLDER),
        epochs=1, batch_size=FOCUS_BATCH, learning_rate=options.effective_learning_rate, device=placement.device,
        dtype=placement.dtype, has_val=bool(prepared.val), lr_scheduler=options.lr_scheduler,
        warmup_ratio=options.warmup_ratio, weight_decay=options.weight_decay, logging_steps=options.logging_steps,
        seed=options.seed, gradient_checkpointing=bool(run.gradient_checkpointing),
        max_batch_tokens=run.max_batch_tokens)
    say(f"focus: {prepared.focus_exchanges} exchanges holding words the model did not know, "
        f"{run.focus_copies} times each")
    held, teacher = anchors(first.trainer.model, prepared, options.seed)
    examples = [dict(e, teacher_index=e.get("teacher_index") or [-1] * len(e["input_ids"]))
                for e in prepared.focus] + held
    tokens = sum(len(example["input_ids"]) for example in examples)
    second = run_trainer(first.trainer.model, tokenizer, examples, prepared.val, arguments,
                         teacher=teacher, deadline=focus_deadline(deadline, run.plan, tokens))
    offset = first.trainer.state.global_step
    history = [dict(entry, step=entry.get("step", 0) + offset) for entry in second.trainer.state.log_history]
    second.trainer.state.log_history = first.trainer.state.log_history + history
    before, after = first.metrics, second.metrics
    focus = {"steps": second.trainer.state.global_step, "train_loss": after.get("train_loss"),
             "train_runtime_s": after.get("train_runtime_s", 0.0), "tokens_seen": after.get("tokens_seen", 0),
             "exchanges": prepared.focus_exchanges, "repeats": run.focus_copies}
    if second.interrupted:
        focus["stopped"] = "interrupted"
    metrics = before | {"steps": before.get("steps", 0) + focus["steps"],
                        "train_runtime_s": round(before.get("train_runtime_s", 0.0) + focus["train_runtime_s"], 1),
                        "focus": focus}
    metrics |= {key: after[key] for key in ("eval_loss", "eval_perplexity") if key in after}
    return RunResult(second.trainer, metrics)
