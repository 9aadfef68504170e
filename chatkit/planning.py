"""Planning a run: the data read and tokenized, the plan made (under a time budget, what fits), and the
values it resolved handed on as one frozen RunPlan (runplan.py), beside the options, which never change."""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Tuple

from .costs import Shape
from .device import Placement, training_paths
from .dpo import tokenize_preferences
from .examples import trained_tokens
from .families import family_of
from .formatting import ensure_chat_template
from .models import ModelSource, check_model, load_config, load_model, load_tokenizer
from .machine import Machine, calibrate
from .options import TrainOptions
from .output import duration, say
from .plan import Choice, Request, choose, parse_duration
from .rehearsal import auto_count
from .rundata import REHEARSAL_TOKENS, Data, ranking_tokens, prompt_tokens, read_data, tokenize_data
from .runplan import RunPlan
from .runreport import report_chosen, report_examples, report_questions


LONG_RUN_S = 3600  # above this, a run without --time-budget says how to make it shorter


def default_batch_tokens(placement: Placement) -> int:
    # 1024 tokens keep CPU training of the starter model near 2.5 GiB (bench/train_memory.py); a GPU holds more.
    return 1024 if placement.device == "cpu" else 16384


def make_plan(run: RunPlan, data: Data, shape: Shape, machine: Machine, order: Optional[List[int]] = None,
              spent_s: float = 0.0) -> Choice:
    """How big, how long and how much memory for the model's `shape` on the calibrated `machine`; under
    --time-budget, what fits (`order`: the units to take first, `spent_s`: the seconds choosing them took)."""
    options = run.options
    questions = report_questions(run, report_chosen(run, data))
    request = Request(
        lengths=[[len(e["input_ids"]) for e in examples] for examples in data.train],
        trained=[trained_tokens(examples) for examples in data.train],
        val_tokens=sum(len(e["input_ids"]) for e in data.val), val_examples=len(data.val),
        batch_size=options.batch_size, epochs=options.epochs, max_batch_tokens=run.max_batch_tokens,
        gradient_checkpointing=options.gradient_checkpointing, lora=options.lora, rehearsal=run.rehearsal,
        budget_s=parse_duration(options.time_budget) if options.time_budget else None, seed=options.seed,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        extra=[REHEARSAL_TOKENS] * run.rehearsal, ranking_tokens=ranking_tokens(data),
        report_answers=2 * len(questions),
        report_tokens=sum(len(e["input_ids"]) for e in report_examples(data, options.time_budget)[0]),
        report_prompt_tokens=2 * prompt_tokens(questions),
        preference_tokens=data.preferences.pair_tokens() if data.preferences else [],
        preference_epochs=options.dpo_epochs, order=order, spent_s=spent_s)
    return choose(request, shape, machine)


def plan_run(options: TrainOptions, source: ModelSource, placement: Placement) -> Tuple[RunPlan, Data, object]:
    """Read and tokenize the data, plan the run and say the plan, before loading the model. Returns the
    run as planned, the data it keeps and the tokenizer."""
    conversations, train_convs, val_convs = read_data(options)
    tokenizer, config = load_tokenizer(source, trust_remote_code=options.trust_remote_code), load_config(source)
    max_length = check_model(source, config, tokenizer, options.max_length,
                             asked=options.max_length != TrainOptions.max_length)
    run = RunPlan.asked(options, max_length=max_length,
                        rehearsal=auto_count(len(conversations)) if options.rehearsal is None else options.rehearsal,
                        max_batch_tokens=options.max_batch_tokens or default_batch_tokens(placement))
    ensure_chat_template(tokenizer, family_of(config))
    data = tokenize_data(run, tokenizer, train_convs, val_convs)
    if options.preferences:
        data.preferences = tokenize_preferences(options, tokenizer, max_length)
    bits = 4 if options.load_in_4bit else 8 if options.load_in_8bit else 32
    shape, machine = Shape.from_config(config, bits), calibrate(placement.device, options.max_memory)
    choice = make_plan(run, data, shape, machine)
    if options.time_budget and options.budget_selection == "surprise" and len(choice.kept) < len(data.train):
        data, choice = choose_by_surprise(run, source, placement, data, choice, tokenizer, shape, machine)
    run = dataclasses.replace(run, batch_size=choice.batch_size, epochs=choice.epochs,
                              gradient_checkpointing=choice.gradient_checkpointing, rehearsal=choice.rehearsal,
                              max_batch_tokens=choice.max_batch_tokens, plan=choice.plan,
                              report=options.report if choice.report_answers else "none")
    data = data.keep(choice.kept, choice.val_examples)
    say_plan(run, data, placement)
    return run, data, tokenizer


def say_plan(run: RunPlan, data: Data, placement: Placement) -> None:
    say(run.plan.describe())
    paths = training_paths(placement)
    if paths:
        say(paths)
    if data.report.dropped:
        say("  " + "; ".join(f"left out {count} {why}" for why, count in data.report.dropped.items())
            + " (raise --max-length to keep them)")
    if run.plan.estimated_seconds > LONG_RUN_S and not run.options.time_budget:
        say(f"note: this run takes about {duration(run.plan.estimated_seconds)} on {placement.describe()}. "
            "--time-budget 30m trains a finished model on what fits in 30 minutes; --dry-run shows the plan "
            "without training; a GPU is much faster (docs/HUGGINGFACE-TRAINING-GUIDE.md)")


SCORE_SHARE = 1 / 3  # of a time budget, at most, for scoring exchanges not scored before


def choose_by_surprise(run: RunPlan, source: ModelSource, placement: Placement, data: Data, first: Choice,
                       tokenizer, shape: Shape, machine: Machine) -> Tuple[Data, Choice]:
    """A budget too short for one pass: the data as single exchanges, the base model's most surprising
    first (scored once, forward only, and cached), near-duplicates left out; the plan made again on them."""
    import gc
    import random

    from . import selection
    from .adapters import quantization_config

    options = run.options
    units = selection.exchange_units(data.conversations)
    unit_data = tokenize_data(run, tokenizer, units, data.val_conversations)
    unit_data.preferences = data.preferences
    cache = selection.ScoreCache(selection.model_key(source))
    todo = selection.missing(units, cache)
    # forward only: about a third of a training step's cost per token, at the first plan's rate
    per_token = first.plan.parts.get("training", 0.0) / max(1.0, first.plan.tokens * first.plan.epochs) / 3
    room = SCORE_SHARE * parse_duration(options.time_budget) / max(per_token, 1e-9)
    random.Random(options.seed).shuffle(todo)
    while todo and selection.score_tokens(units, todo) > room:  # more than a budget's share: a seeded sample
        todo = todo[:len(todo) * 3 // 4]
    started, estimate = time.perf_counter(), selection.score_tokens(units, todo) * per_token
    if todo and options.dry_run:  # the plan only: scoring's estimated time counted, nothing scored
        say(f"selection: {len(todo)} exchanges would be scored with the base model first (about "
            f"{duration(estimate)}); the plan below takes them in a random order")
        return unit_data, make_plan(run, unit_data, shape, machine, spent_s=estimate,
                                    order=selection.surprise_order([None] * len(units), [], options.seed))
    if todo:
        selection.say_scoring(len(todo), estimate)
        loaded = load_model(source, placement, quantization_config=quantization_config(options, placement),
                            tokenizer=tokenizer)
        selection.score(loaded.model, tokenizer, units, cache, todo)
        del loaded
        gc.collect()
    spent = time.perf_counter() - started
    scores = [cache.scores.get(selection.unit_key(unit)) for unit in units]
    left_out = selection.near_duplicates(units)
    order = selection.surprise_order(scores, left_out, options.seed)
    say(selection.describe(len(units), len(todo), spent, len(left_out), sum(s is None for s in scores)))
    return unit_data, make_plan(run, unit_data, shape, machine, order=order, spent_s=spent)
