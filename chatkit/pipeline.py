"""One fine-tuning run of train_chatgpt_model.py, as stages: the folder checked, the run planned, the model
loaded, the data prepared, the Trainer run, preferences learned, the model published with its report.

Each stage hands the next a frozen value: the options as asked (TrainOptions), the run as planned
(planning.RunPlan), the trainer's one configuration (engine.ChatTrainingArguments, built once from the plan)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

from .adapters import prepare_model, quantization_config
from .budget import budget_record, make_deadline
from .device import Placement, choose_placement
from .dpo import learn_preferences, read_pairs
from .errors import ChatkitError
from .files import output_lock, write_training_info
from .models import ModelSource, resolve_model
from .options import TrainOptions
from .optionspec import problems
from .output import say
from .planning import plan_run
from .runplan import RunPlan
from .rehearsal import Rehearsal
from .rundata import prepare_examples, rehearse
from .runfolder import RUNS, CHECKPOINTS, RunFolder, push_to_hub, run_record, save_model
from .runreport import ReportRun


def train(options: TrainOptions) -> dict:
    """The whole run: plan, model, rehearsal, Trainer, best checkpoint, saving. Returns the final metrics.

    One run at a time writes into an --output: a second is refused while the first holds its lock."""
    found = problems(options)
    if found:
        raise ChatkitError("; ".join(found))
    RunFolder(options).check()
    if options.preferences:  # a bad pair is found before anything slow
        read_pairs(options.preferences)
    # Under accelerate launch the ranks of one run share its output: the main process holds the lock.
    helper = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) != 0
    with contextlib.nullcontext() if options.dry_run or helper else output_lock(options.output):
        return _train(options)


def _train(options: TrainOptions) -> dict:
    folder = RunFolder(options)
    checkpoint = folder.resume_checkpoint()
    placement = choose_placement(options.device, options.dtype, training=True)
    if placement.warning():
        say(placement.warning())
    source = resolve_model(options.model)
    quantization_config(options, placement)  # fail before loading anything when QLoRA cannot run
    run, data, tokenizer = plan_run(options, source, placement)
    if options.dry_run:
        return {"dry_run": True, "plan": run.plan.to_json()}

    from transformers import set_seed

    from .engine import run_trainer
    from .focus import learn_focus

    set_seed(options.seed)  # the adapter's initial weights too, so --seed repeats the whole run
    model, tokenizer = prepare_model(options, source, placement, tokenizer, run.gradient_checkpointing)
    folder.clear_old_run()
    prepared = prepare_examples(run, model, tokenizer, data,
                                rehearse(run, model, tokenizer, data, resuming=checkpoint is not None))
    say(describe_run(run, source, placement))
    say(prepared.describe(data.report, options.packing))
    report = ReportRun(run, data, placement)
    if not options.lora:  # the base model's side, before its weights change
        report.measure_base(model, tokenizer)
    deadline = make_deadline(options, run.plan, checkpoint, prepared.tokens())
    arguments = trainer_arguments(run, placement, has_val=bool(prepared.val))
    result = run_trainer(model, tokenizer, prepared.train, prepared.val, arguments, checkpoint,
                         teacher=prepared.teacher, deadline=deadline)
    if result.interrupted:
        say(f"Stopped early; checkpoint saved in {result.checkpoint}. Continue with the same command plus "
            f"--resume {options.output}")
        return {"interrupted": True, "checkpoint": result.checkpoint}
    if prepared.focus:  # a budget's focus stage, after the conversations
        result = learn_focus(run, placement, tokenizer, prepared, deadline, result)
    preferred = learn_preferences(options, result.trainer.model, data.preferences, deadline,
                                  run.plan.parts.get("preferences", 0.0)) if data.preferences else {}
    budget = budget_record(run.plan, deadline, result.metrics | preferred)
    return finish(result, tokenizer, run, source, prepared.rehearsal, report,
                  preferred | ({"time_budget": budget} if budget is not None else {}))


def trainer_arguments(run: RunPlan, placement: Placement, has_val: bool):
    """The trainer's one configuration, built once from the run as planned."""
    from .engine import ChatTrainingArguments

    options = run.options
    output = Path(options.output)
    return ChatTrainingArguments.for_run(
        checkpoints_dir=str(output / CHECKPOINTS), logs_dir=str(output / RUNS), epochs=run.epochs,
        batch_size=run.batch_size, learning_rate=options.effective_learning_rate, device=placement.device,
        dtype=placement.dtype, has_val=has_val, gradient_accumulation_steps=options.gradient_accumulation_steps,
        lr_scheduler=options.lr_scheduler, warmup_ratio=options.warmup_ratio, weight_decay=options.weight_decay,
        logging_steps=options.logging_steps, eval_steps=options.eval_steps, save_steps=options.save_steps,
        seed=options.seed, gradient_checkpointing=bool(run.gradient_checkpointing), packing=options.packing,
        early_stopping_patience=options.early_stopping_patience, neftune_alpha=options.neftune_alpha,
        max_batch_tokens=run.max_batch_tokens)


def describe_run(run: RunPlan, source: ModelSource, placement: Placement) -> str:
    """The resolved configuration in a line (every option is saved in OUTPUT/chatkit.json)."""
    options = run.options
    accumulated = (f" x {options.gradient_accumulation_steps} accumulated"
                   if options.gradient_accumulation_steps > 1 else "")
    return (f"model {source.describe()} on {placement.describe()}, {options.method}"
            + (f" (rank {options.lora_r})" if options.lora else "")
            + f"; batch {run.batch_size}{accumulated}, learning rate {options.effective_learning_rate:g} "
              f"({options.lr_scheduler}), max length {run.max_length}, seed {options.seed}")


def finish(result, tokenizer, run: RunPlan, source: ModelSource, rehearsal: Rehearsal,
           report: Optional[ReportRun] = None, after_training: Optional[dict] = None) -> dict:
    """Save the trained model, write its report and say where it is and how well it did. The run's figures
    are put together here, once: the Trainer's, what followed training (`after_training`), the rehearsal's
    and the report's. Returns them."""
    options = run.options
    metrics = result.metrics | (after_training or {})
    if run.rehearsal:
        metrics |= {"rehearsal_examples": len(rehearsal.conversations), "rehearsal_s": round(rehearsal.seconds, 1)}
    if not result.trainer.is_world_process_zero():
        return metrics
    model = result.trainer.model
    trained = report.measure_trained(model, tokenizer) if report else None
    if report:
        metrics |= report.figures(trained)
    info = run_record(tokenizer, options, source, metrics, rehearsal.conversations, run.plan,
                      {"trained": len(report.data.conversations), "validation": len(report.data.val_conversations)}
                      if report else None, recorded=run.recorded_options())
    with RunFolder(options).staging() as staging:  # published whole: the model, its report and its record
        save_model(staging, model, tokenizer, options, info)
        reported = report.write(staging, trained, source, metrics, result.trainer.state,
                                info["reproducibility"]) if report else ""
        write_training_info(staging, info)
    say(done_text(options, metrics, reported))
    if options.push_to_hub:
        push_to_hub(options)
    return metrics


def done_text(options: TrainOptions, metrics: dict, reported: str) -> str:
    from .engine import perplexity

    summary = f"train loss {metrics['train_loss']} (perplexity {perplexity(metrics['train_loss'])})"
    if "eval_loss" in metrics:
        summary += f", validation loss {metrics['eval_loss']} (perplexity {metrics['eval_perplexity']})"
    merged = f" (standalone merged copy in {Path(options.output) / 'merged'})" if options.merge and options.lora else ""
    if (metrics.get("time_budget") or {}).get("changes"):
        summary += f"; time budget kept: {metrics['time_budget']['summary']}"
    return (f"\nDone in {metrics['train_runtime_s']:.0f} s: {summary}.\nModel saved in {options.output}{merged}"
            + (f"\n{reported}" if reported else "")
            + f"\nTalk to it:  python demo_chatbot.py {options.output}"
            f"\nTensorBoard: tensorboard --logdir {Path(options.output) / RUNS}")
