"""The focus stage of a run a time budget shortened: after the conversations, the exchanges that hold what the
base model does not know of the user's world (selection.py), several times each, with a learning-rate
schedule and an optimizer of its own. Mixed among the conversations the same repeats taught no fact: the
conversations' steps washed them out (docs/PERFORMANCE.md, "Choosing what a budget trains"). The
rehearsal's examples, when the run has them, go with the focus (rundata.prepare_examples puts them there;
plan.py counts them in the stage).

Imported only when training runs: it imports the engine, which imports torch.
"""

from __future__ import annotations

from pathlib import Path

from .budget import focus_deadline
from .engine import ChatTrainingArguments, RunResult, run_trainer
from .output import say
from .plan import FOCUS_BATCH
from .runfolder import CHECKPOINTS, RUNS

FOCUS_FOLDER = "focus"  # the stage's checkpoints and logs, beside the run's


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
    tokens = sum(len(example["input_ids"]) for example in prepared.focus)
    second = run_trainer(first.trainer.model, tokenizer, prepared.focus, prepared.val, arguments,
                         teacher=prepared.teacher, deadline=focus_deadline(deadline, run.plan, tokens))
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
