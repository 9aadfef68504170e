"""Planning a run: the data read and tokenized, the plan made (under a time budget, what fits), and the
values it resolved handed on as one frozen RunPlan (runplan.py), beside the options, which never change."""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Tuple

from .costs import Shape, reading_seconds
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


def make_plan(run: RunPlan, data: Data, shape: Shape, machine: Machine, spent_s: float = 0.0) -> Choice:
    """How big, how long and how much memory for the model's `shape` on the calibrated `machine`; under
    --time-budget, what fits (the data's focus exchanges first; `spent_s`: the seconds choosing them took)."""
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
        preference_epochs=options.dpo_epochs, spent_s=spent_s,
        focus=[(len(e["input_ids"]), trained_tokens([e])) for e in data.focus])
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
    if options.time_budget and options.budget_selection == "surprise" and choice.shortened:
        data, choice, machine = choose_focus(run, source, placement, data, tokenizer, shape, machine)
    run = dataclasses.replace(run, batch_size=choice.batch_size, epochs=choice.epochs,
                              gradient_checkpointing=choice.gradient_checkpointing, rehearsal=choice.rehearsal,
                              max_batch_tokens=choice.max_batch_tokens, plan=choice.plan,
                              report=options.report if choice.report_answers else "none",
                              focus_copies=choice.focus_copies)
    data = data.keep(choice.kept, choice.val_examples, choice.focus)
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


SCORE_SHARE = 1 / 3  # of a time budget, at most, for reading exchanges not read before


def choose_focus(run: RunPlan, source: ModelSource, placement: Placement, data: Data, tokenizer, shape: Shape,
                 machine: Machine) -> Tuple[Data, Choice, Machine]:
    """A budget shorter than the schedule: every exchange read by the base model (forward only, once, cached),
    the ones holding words it does not know that recur across the user's conversations found, and the plan
    made again with them first (selection.py); the machine's rate as reading measured it."""
    import gc
    import random

    from . import selection
    from .adapters import quantization_config

    options = run.options
    units, owners = selection.exchange_units(data.conversations)
    vocabulary = selection.Vocabulary(tokenizer)
    worth = selection.candidates(units, owners, vocabulary)
    cache = selection.ScoreCache(selection.model_key(source))
    to_read = set(worth) & set(selection.missing(units, cache))  # worth reading, not read by an earlier run
    todo = sorted(to_read)
    room = SCORE_SHARE * parse_duration(options.time_budget)
    random.Random(options.seed).shuffle(todo)
    while todo and reading_seconds(selection.score_tokens(units, todo), shape, machine) > room:
        todo = todo[:len(todo) * 3 // 4]  # more than a budget's share: a seeded sample
    started, estimate = time.perf_counter(), reading_seconds(selection.score_tokens(units, todo), shape, machine)
    if todo and options.dry_run:  # the plan only: reading's estimated time counted, nothing read
        say(f"selection: {len(todo)} exchanges would be read by the base model first (about {duration(estimate)}); "
            "the plan below does not yet hold the exchanges it would train first")
        return data, make_plan(run, data, shape, machine, spent_s=estimate), machine
    if todo:
        selection.say_scoring(len(todo), estimate)
        loaded = load_model(source, placement, quantization_config=quantization_config(options, placement),
                            tokenizer=tokenizer)
        read_started = time.perf_counter()
        selection.score(loaded.model, tokenizer, units, cache, todo)
        machine = measured_machine(machine, estimate, time.perf_counter() - read_started)
        del loaded
        gc.collect()
    spent = time.perf_counter() - started
    words = selection.recurring(units, owners, cache, vocabulary)
    left_out = selection.near_duplicates(units)
    order, focus = selection.focus_examples(units, words, left_out, tokenizer, run.max_length, options.system_prompt,
                                            options.train_on_prompt)
    unread = len(to_read - set(todo))
    say(selection.describe(len(units), len(worth), len(todo), spent, len(left_out), unread, [words[i] for i in order]))
    data = dataclasses.replace(data, focus=focus)
    return data, make_plan(run, data, shape, machine, spent_s=spent), machine


def measured_machine(machine: Machine, estimate: float, seconds: float) -> Machine:
    """The machine's rate as reading the exchanges measured it: a minute or more of the model's own work says
    more than the calibration's fraction of a second (within a factor of 2 of it)."""
    if estimate <= 0 or seconds <= 0:
        return machine
    return dataclasses.replace(machine, gflops=machine.gflops * min(2.0, max(0.5, estimate / seconds)),
                               measured_by="while reading the exchanges")
