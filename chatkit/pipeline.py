"""One fine-tuning run of train_chatgpt_model.py: data, model, rehearsal, engine, saving, the Hub."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .datasets import default_val_split, read_conversations, split_train_val
from .device import Placement, choose_placement, training_paths
from .errors import ChatkitError
from .examples import ExampleReport, pack_examples, tokenize_examples, trained_tokens
from .families import family_of
from .files import output_lock, read_json_object, reproducibility, training_info, write_json, write_training_info
from .formatting import ensure_chat_template, ensure_pad_token
from .models import (ModelSource, check_model, load_config, load_model, load_tokenizer, merge_adapter, public_name,
                     resolve_model)
from .options import TrainOptions, problems
from .output import Progress, duration, say
from .plan import BUDGET_VAL_EXAMPLES, CHARS_PER_TOKEN, Choice, Request, Shape, calibrate, choose, parse_duration
from .rehearsal import Rehearsal, attach_teacher, auto_count, rehearsal_conversations
from .report import (PLOT_FILE, REPORT_FILE, RunFacts, Side, chosen_prompts, loss_examples, measure, report_prompts,
                     system_prompts)
from .runfolder import CHECKPOINTS, RUNS, RunFolder

STARTED = time.time()  # when the package was imported: close to the command's start


BNB_CPU_VERSION = "0.47"  # bnb_runs_on_cpu passes from 0.47 (0.45 has no CPU kernels); training measured with 0.50


def quantization_config(options: TrainOptions, placement: Placement):
    """bitsandbytes' settings for --load-in-4bit (nf4, QLoRA) or --load-in-8bit; None without either.

    On the CPU the layers compute in float32 (the CPU's fast precision) through bitsandbytes' CPU backend;
    on a GPU in the run's precision."""
    if not (options.load_in_4bit or options.load_in_8bit):
        return None
    if placement.device == "mps":
        raise ChatkitError("--load-in-4bit/--load-in-8bit: bitsandbytes has no Apple MPS backend; train on "
                           "the CPU (--device cpu) or drop the flag to train LoRA in float32 on MPS")
    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ChatkitError(f"--load-in-4bit/--load-in-8bit need bitsandbytes: pip install "
                           f"'bitsandbytes>={BNB_CPU_VERSION}' ({exc})") from None
    if placement.device == "cpu" and not bnb_runs_on_cpu():
        raise ChatkitError(
            f"--load-in-4bit/--load-in-8bit on the CPU need bitsandbytes {BNB_CPU_VERSION} or newer with its CPU "
            f"backend; this is bitsandbytes {getattr(bitsandbytes, '__version__', '?')}: pip install -U "
            f"'bitsandbytes>={BNB_CPU_VERSION}', or drop the flag to train LoRA in float32")
    if options.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=placement.torch_dtype)


@functools.lru_cache(maxsize=None)
def bnb_runs_on_cpu() -> bool:
    """Whether this bitsandbytes quantizes and dequantizes CPU tensors (a round trip of a few numbers)."""
    import torch

    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        values = torch.linspace(-1, 1, 64).reshape(8, 8)
        packed, state = quantize_4bit(values, quant_type="nf4")
        return bool((dequantize_4bit(packed, state) - values).abs().max() < 0.2)
    except Exception:  # noqa: BLE001 - a build without CPU kernels refuses in its own ways
        return False


def prepare_model(options: TrainOptions, source: ModelSource, placement: Placement, tokenizer=None):
    """Load the model (and the tokenizer, unless given), and wrap the model with LoRA unless training it whole."""
    loaded = load_model(source, placement, trust_remote_code=options.trust_remote_code,
                        quantization_config=quantization_config(options, placement), adapter_trainable=True,
                        tokenizer=tokenizer)
    model, tokenizer = loaded.model, loaded.tokenizer
    family = family_of(model.config)
    ensure_chat_template(tokenizer, family)
    ensure_pad_token(tokenizer)
    if options.gradient_checkpointing:
        model.config.use_cache = False
    from .kernels import fuse_lora

    if not options.lora or source.kind == "adapter":
        fuse_lora(model)  # an adapter trained further
        return model, tokenizer
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if options.load_in_4bit or options.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
        keep_4bit_layout(model)
        release_weights_file(model)
    targets = lora_targets(options.lora_target_modules, family)
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise ChatkitError(f"--lora-target-modules {options.lora_target_modules}: {exc}") from None
    fuse_lora(model)
    return model, tokenizer


def keep_4bit_layout(model) -> None:
    """Keep every 4-bit layer in the one layout that trains.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for its inference kernel the first time
    it runs in eval mode without gradients (a validation pass between steps, the report), and keeps it so.
    That kernel has no backward: the steps after it would train the adapter with wrong gradients, silently
    (and a layer narrower than a quantization block fails to repack at all)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def release_weights_file(model) -> None:
    """Copy a quantized model's full-precision tensors (embeddings, norms) out of the weights file.

    Loading reads every weight of the memory-mapped file to quantize it, and a tensor left as a view of
    the file keeps all of its pages resident: for the starter about 0.5 GiB more than the 4-bit model needs."""
    import gc

    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.clone()
    gc.collect()


def lora_targets(option: str, family):
    """--lora-target-modules as peft takes it: all-linear is the family's attention and MLP matrices
    (peft's own all-linear for a model the family table lacks)."""
    if option == "all-linear":
        return list(family.lora_targets) if family is not None else option
    return [name.strip() for name in option.split(",") if name.strip()]


@dataclass
class Data:
    """The tokenized data: training examples kept per conversation (a time budget keeps whole ones; `keep`
    takes each conversation's count of examples, so bench/budget_selection.py can measure other rules)."""

    conversations: List[List[dict]]  # the training conversations
    train: List[List[dict]]  # their examples, per conversation
    val: List[dict]
    report: ExampleReport
    val_conversations: List[List[dict]] = dataclasses.field(default_factory=list)
    preferences: Optional["Preferences"] = None  # with --preferences: the pairs, tokenized

    def keep(self, kept: Sequence[Tuple[int, int]], val_examples: Optional[int]) -> "Data":
        """The conversations a plan kept, each (index, its first n examples); fewer validation examples under a
        time budget."""
        val = self.val if val_examples is None else self.val[:val_examples]
        train = [self.train[i][:n] for i, n in kept]
        examples = [example for group in train for example in group]
        sampled = len(examples) < sum(map(len, self.train))  # the data-wide counts below were said with the plan
        report = dataclasses.replace(
            self.report, conversations=len(kept), examples=len(examples),
            split_conversations=0 if sampled else self.report.split_conversations,
            cut_exchanges=0 if sampled else self.report.cut_exchanges,
            dropped=Counter() if sampled else self.report.dropped,
            tokens=sum(len(e["input_ids"]) for e in examples),
            trained_tokens=trained_tokens(examples))
        return Data([self.conversations[i] for i, _ in kept], train, val, report, self.val_conversations,
                    self.preferences)

    def user_prompts(self) -> List[str]:
        return [m["content"] for c in self.conversations for m in c if m["role"] == "user"]


def tokenize_data(options: TrainOptions, tokenizer, train_convs, val_convs) -> Data:
    def tokenize(conversations, report=None):
        return tokenize_examples(conversations, tokenizer, options.max_length, options.system_prompt,
                                 options.train_on_prompt, report)

    report = ExampleReport()
    data = Data(list(train_convs), [tokenize([c], report) for c in train_convs], tokenize(val_convs), report,
                list(val_convs))
    if report.trained_tokens == 0:
        raise ChatkitError(
            f"{', '.join(options.data)}: no token would be trained (the assistant turns are empty or cut); "
            "check the data, raise --max-length, or pass --train-on-prompt"
        )
    return data


REHEARSAL_FILE = "rehearsal.json"  # beside the checkpoints: a resumed run reuses the same answers
REHEARSAL_TOKENS = 90  # a rehearsal example's length, for the plan (a prompt and up to 64 answer tokens)


def rehearse(options: TrainOptions, model, tokenizer, data: Data, resuming: bool) -> Rehearsal:
    """The model's own answers to general prompts: generated, or read back when resuming a run."""
    saved = Path(options.output) / CHECKPOINTS / REHEARSAL_FILE
    if resuming and options.rehearsal and saved.is_file():
        conversations = read_json_object(saved, "delete it to generate the answers again")["conversations"]
        say(f"rehearsal: reusing the {len(conversations)} answer{'s' if len(conversations) != 1 else ''} saved with the checkpoints")
        return Rehearsal(conversations=conversations, asked=len(conversations))
    rehearsal = rehearsal_conversations(model, tokenizer, options.rehearsal, options.system_prompt,
                                        like=data.user_prompts())
    if options.rehearsal:
        say(rehearsal.describe())
        write_json(saved, {"conversations": rehearsal.conversations})
    return rehearsal


@dataclass
class Prepared:
    """The token examples of a run, and the rehearsal that was mixed in."""

    train: List[dict]
    val: List[dict]
    rehearsal: Rehearsal
    teacher: object = None

    def describe(self, report: ExampleReport, packing: bool) -> str:
        text = f"training on {report.describe()}"
        if self.rehearsal.conversations:
            count = len(self.rehearsal.conversations)
            text += f", with {count} rehearsal example{'s' if count != 1 else ''}"
        if packing:
            text += f", packed into {len(self.train)} sequences"
        return text + (f"; {len(self.val)} for validation" if self.val else "; no validation split")


def prepare_examples(options: TrainOptions, model, tokenizer, data: Data, rehearsal: Rehearsal) -> Prepared:
    """Training and validation examples, with the model's own rehearsal answers mixed in."""
    train = [example for examples in data.train for example in examples]
    val, teacher = data.val, None
    if rehearsal.conversations:
        rehearsed = tokenize_examples(rehearsal.conversations, tokenizer, options.max_length, options.system_prompt,
                                      options.train_on_prompt)
        teacher = attach_teacher(model, rehearsed)
        for example in train:
            example["teacher_index"] = [-1] * len(example["input_ids"])
        train += rehearsed
    if options.packing:
        train = pack_examples(train, options.max_length)
        val = pack_examples(val, options.max_length) if val else []
    return Prepared(train, val, rehearsal, teacher)


def ranking_tokens(data: Data) -> int:
    """About how many tokens choosing the rehearsal prompts reads (rehearsal.closest_prompts)."""
    from .rehearsal import GENERAL_PROMPTS, PROMPT_CHARS, SAMPLED_PROMPTS

    prompts = data.user_prompts()
    sampled = min(len(prompts), SAMPLED_PROMPTS)
    mean_chars = sum(min(len(p), PROMPT_CHARS) for p in prompts) / max(1, len(prompts))
    return int(sampled * (mean_chars / CHARS_PER_TOKEN + 20) + len(GENERAL_PROMPTS) * 30)


def prompt_tokens(prompts: List[str]) -> int:
    """About how many tokens `prompts` take, each rendered with the chat template."""
    return sum(len(p) // CHARS_PER_TOKEN + 30 for p in prompts)


def make_plan(options: TrainOptions, source: ModelSource, placement: Placement, data: Data,
              order: Optional[List[int]] = None, spent_s: float = 0.0) -> Choice:
    """How big, how long and how much memory; under --time-budget, what fits (`order`: the units to take
    first, `spent_s`: the seconds choosing them took)."""
    questions = report_questions(options, report_chosen(options, data))
    request = Request(
        lengths=[[len(e["input_ids"]) for e in examples] for examples in data.train],
        trained=[trained_tokens(examples) for examples in data.train],
        val_tokens=sum(len(e["input_ids"]) for e in data.val), val_examples=len(data.val),
        batch_size=options.batch_size, epochs=options.epochs, max_batch_tokens=options.max_batch_tokens,
        gradient_checkpointing=options.gradient_checkpointing, lora=options.lora, rehearsal=options.rehearsal,
        budget_s=parse_duration(options.time_budget) if options.time_budget else None, seed=options.seed,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        extra=[REHEARSAL_TOKENS] * options.rehearsal, ranking_tokens=ranking_tokens(data),
        report_answers=2 * len(questions),
        report_tokens=sum(len(e["input_ids"]) for e in report_examples(data, options.time_budget)[0]),
        report_prompt_tokens=2 * prompt_tokens(questions),
        preference_tokens=data.preferences.pair_tokens() if data.preferences else [],
        preference_epochs=options.dpo_epochs, order=order, spent_s=spent_s)
    bits = 4 if options.load_in_4bit else 8 if options.load_in_8bit else 32
    machine = calibrate(placement.device, options.max_memory)
    return choose(request, Shape.from_config(load_config(source), bits), machine)


DEADLINE_SHARE = 0.95  # of a time budget: the rest is for exiting and what no estimate sees


PROCESS_START_WITHIN_S = 60.0  # a process older than this at train() is a notebook or a test, not this command


def command_started() -> float:
    """When this command started (time.time()): a time budget counts from there. That is the process's start,
    imports included, or this call's where the process has been running for longer (a notebook, a test)."""
    now = time.time()
    try:
        import psutil

        started = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or refused: the package's import time is close
        started = STARTED
    return started if now - started < PROCESS_START_WITHIN_S else now


def make_deadline(options: TrainOptions, plan, checkpoint: Optional[str]):
    """The time budget as the engine keeps it (None without --time-budget). A resumed run has what the
    interrupted one left (its spent time is kept beside the checkpoints)."""
    if not options.time_budget:
        return None
    from .engine import BUDGET_FILE, Deadline

    used = 0.0
    spent = Path(options.output) / CHECKPOINTS / BUDGET_FILE
    if checkpoint is not None and spent.is_file():
        used = read_json_object(spent, "delete it to count the budget from now").get("used_s", 0.0)
        if isinstance(used, bool) or not isinstance(used, (int, float)) or not 0 <= used < float("inf"):
            raise ChatkitError(f"{spent}: used_s should be the seconds of the budget spent, not {used!r}; delete "
                               "the file to count the budget from now")
    started = command_started()
    parts = plan.parts
    evaluations = max(1, math.ceil(plan.epochs))  # the plan's: one as each epoch ends
    return Deadline(finish_by=started + parse_duration(options.time_budget) * DEADLINE_SHARE - used,
                    after_s=parts.get("report", 0) + parts.get("evaluation", 0) + parts.get("preferences", 0),
                    report_s=parts.get("report", 0), saving_s=parts.get("saving", 0),
                    evaluation_s=parts.get("evaluation", 0) / evaluations, evaluations=evaluations,
                    planned_step_s=parts.get("training", 0) / max(plan.steps, 1), started=started,
                    used_before_s=used)


def budget_record(plan, deadline, metrics: dict) -> Optional[dict]:
    """What chatkit.json and the card say of a time budget: planned, trained, and why they differ."""
    if deadline is None:
        return None
    trained_steps = metrics.get("steps", 0)
    why = [deadline.describe() or f"{trained_steps} steps as planned"]
    if metrics.get("dpo_stopped"):
        why.append(f"DPO stopped after {metrics['dpo_steps']} of {metrics['dpo_planned_steps']} steps "
                   f"({metrics['dpo_stopped']})")
    return {"planned_steps": plan.steps, "trained_steps": trained_steps, "changes": deadline.changes,
            "summary": "; ".join(why)}


def engine_settings(options: TrainOptions):
    from .engine import EngineSettings

    output = Path(options.output)
    return EngineSettings(
        checkpoints_dir=str(output / CHECKPOINTS), logs_dir=str(output / RUNS), epochs=options.epochs,
        batch_size=options.batch_size, learning_rate=options.effective_learning_rate,
        gradient_accumulation_steps=options.gradient_accumulation_steps, lr_scheduler=options.lr_scheduler,
        warmup_ratio=options.warmup_ratio, weight_decay=options.weight_decay, logging_steps=options.logging_steps,
        eval_steps=options.eval_steps, save_steps=options.save_steps, seed=options.seed,
        gradient_checkpointing=bool(options.gradient_checkpointing), packing=options.packing,
        early_stopping_patience=options.early_stopping_patience, neftune_alpha=options.neftune_alpha,
        max_batch_tokens=options.max_batch_tokens,
    )


def describe_run(options: TrainOptions, source: ModelSource, placement: Placement) -> str:
    """The resolved configuration in a line (every option is saved in OUTPUT/chatkit.json)."""
    accumulated = (f" x {options.gradient_accumulation_steps} accumulated"
                   if options.gradient_accumulation_steps > 1 else "")
    return (f"model {source.describe()} on {placement.describe()}, {options.method}"
            + (f" (rank {options.lora_r})" if options.lora else "")
            + f"; batch {options.batch_size}{accumulated}, learning rate {options.effective_learning_rate:g} "
              f"({options.lr_scheduler}), max length {options.max_length}, seed {options.seed}")


def base_model_spec(source: ModelSource) -> str:
    """How a trained adapter names its base: friendly names and Hub ids as typed, local paths absolute."""
    base = source.base if source.kind == "adapter" else source
    return os.path.abspath(base.spec) if os.path.exists(os.path.expanduser(base.spec)) else base.spec


def run_record(tokenizer, options: TrainOptions, source: ModelSource, metrics: dict,
               rehearsed: Sequence[List[dict]] = (), plan=None, conversations: Optional[dict] = None) -> dict:
    """The chatkit.json record of a trained model; `metrics` is held by reference, so figures added later
    (the report's) are in it when it is written."""
    return training_info(
        "lora" if options.lora else "full", tokenizer.chat_template,
        base_model=base_model_spec(source) if options.lora else None, system_prompt=options.system_prompt,
        options=dataclasses.asdict(options) | {"learning_rate": options.effective_learning_rate},
        metrics=metrics, rehearsal=list(rehearsed),  # the general prompts and own answers trained alongside
        plan=plan.to_json() if plan is not None else None,
        reproducibility=reproducibility([*options.data, *([options.preferences] if options.preferences else [])],
                                        options.seed, conversations),
    )


def save_model(staging: Path, model, tokenizer, options: TrainOptions, info: dict) -> None:
    """The model, its tokenizer and (with --merge) a standalone merged copy, saved into `staging`."""
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if options.merge and options.lora:
        say(f"Writing a standalone merged model to {Path(options.output) / 'merged'} ...")
        write_training_info(staging, info)  # the adapter loads with its record: its base model, its template
        merged = merge_adapter(load_model(str(staging), choose_placement("cpu", "float32")).model)
        merged.save_pretrained(staging / "merged")
        tokenizer.save_pretrained(staging / "merged")
        write_training_info(staging / "merged", dict(info, base_model=None, method="lora-merged"))


def push_to_hub(options: TrainOptions) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(options.hub_name, private=True, exist_ok=True)
        api.upload_folder(folder_path=options.output, repo_id=options.hub_name,
                          ignore_patterns=[f"{CHECKPOINTS}/*", f"{RUNS}/*"])
    except Exception as exc:  # network, authentication, permissions: all reported the same way
        raise ChatkitError(
            f"--push-to-hub {options.hub_name}: upload failed ({type(exc).__name__}); log in with "
            "`huggingface-cli login` (or set HF_TOKEN) and check the name. The model is saved in "
            f"{options.output}"
        ) from None
    say(f"Pushed to https://huggingface.co/{options.hub_name} (private)")


def read_data(options: TrainOptions):
    """The training conversations: data files as they are, ChatGPT exports (zip, folder, conversations
    file) converted first with the converter's default policy."""
    from .conversion import convert_in_memory, summary_line
    from .export import looks_like_export

    exports = [path for path in options.data if looks_like_export(path)]
    converted = []
    if exports:
        records, stats = convert_in_memory(exports, redact=options.redact)
        say(f"{', '.join(exports)}: {summary_line(stats)}")
        converted.append((", ".join(exports), records))
    conversations, data_report = read_conversations([p for p in options.data if p not in exports], converted)
    say(data_report.describe())
    val_split = options.val_split if options.val_split is not None else default_val_split(len(conversations))
    train_convs, val_convs = split_train_val(conversations, val_split, options.seed)
    return conversations, train_convs, val_convs


LONG_RUN_S = 3600  # above this, a run without --time-budget says how to make it shorter


def default_batch_tokens(placement: Placement) -> int:
    # 1024 tokens keep CPU training of the starter model near 2.5 GiB (bench/train_memory.py); a GPU holds more.
    return 1024 if placement.device == "cpu" else 16384


def plan_run(options: TrainOptions, source: ModelSource, placement: Placement):
    """Read and tokenize the data, plan the run and say the plan, before loading the model."""
    conversations, train_convs, val_convs = read_data(options)
    if options.rehearsal is None:
        options = dataclasses.replace(options, rehearsal=auto_count(len(conversations)))
    if options.max_batch_tokens is None:
        options = dataclasses.replace(options, max_batch_tokens=default_batch_tokens(placement))
    tokenizer, config = load_tokenizer(source, trust_remote_code=options.trust_remote_code), load_config(source)
    max_length = check_model(source, config, tokenizer, options.max_length,
                             asked=options.max_length != TrainOptions.max_length)
    if max_length != options.max_length:
        options = dataclasses.replace(options, max_length=max_length)
    ensure_chat_template(tokenizer, family_of(config))
    data = tokenize_data(options, tokenizer, train_convs, val_convs)
    if options.preferences:
        data.preferences = tokenize_preferences(options, tokenizer)
    choice = make_plan(options, source, placement, data)
    if options.time_budget and options.budget_selection == "surprise" and len(choice.kept) < len(data.train):
        data, choice = choose_by_surprise(options, source, placement, data, choice, tokenizer)
    options = dataclasses.replace(options, batch_size=choice.batch_size, epochs=choice.epochs,
                                  gradient_checkpointing=choice.gradient_checkpointing, rehearsal=choice.rehearsal,
                                  max_batch_tokens=choice.max_batch_tokens,
                                  report=options.report if choice.report_answers else "none")
    data = data.keep(choice.kept, choice.val_examples)
    say(choice.plan.describe())
    paths = training_paths(placement)
    if paths:
        say(paths)
    if data.report.dropped:
        say("  " + "; ".join(f"left out {count} {why}" for why, count in data.report.dropped.items())
            + " (raise --max-length to keep them)")
    if choice.plan.estimated_seconds > LONG_RUN_S and not options.time_budget:
        say(f"note: this run takes about {duration(choice.plan.estimated_seconds)} on {placement.describe()}. "
            "--time-budget 30m trains a finished model on what fits in 30 minutes; --dry-run shows the plan "
            "without training; a GPU is much faster (docs/HUGGINGFACE-TRAINING-GUIDE.md)")
    return options, data, choice.plan, tokenizer


SCORE_SHARE = 1 / 3  # of a time budget, at most, for scoring exchanges not scored before


def choose_by_surprise(options: TrainOptions, source: ModelSource, placement: Placement, data: Data,
                       first: Choice, tokenizer) -> Tuple[Data, Choice]:
    """A budget too short for one pass: the data as single exchanges, the base model's most surprising
    first (scored once, forward only, and cached), near-duplicates left out; the plan made again on them."""
    import gc
    import random

    from . import selection

    units = selection.exchange_units(data.conversations)
    unit_data = tokenize_data(options, tokenizer, units, data.val_conversations)
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
        return unit_data, make_plan(options, source, placement, unit_data, spent_s=estimate,
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
    return unit_data, make_plan(options, source, placement, unit_data, order=order, spent_s=spent)


def train(options: TrainOptions) -> dict:
    """The whole run: plan, model, rehearsal, Trainer, best checkpoint, saving. Returns the final metrics.

    One run at a time writes into an --output: a second is refused while the first holds its lock."""
    import contextlib

    found = problems(options)
    if found:
        raise ChatkitError("; ".join(found))
    RunFolder(options).check()
    if options.preferences:  # a bad pair is found before anything slow
        from .dpo import read_pairs

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
    options, data, plan, tokenizer = plan_run(options, source, placement)
    if options.dry_run:
        return {"dry_run": True, "plan": plan.to_json()}

    from transformers import set_seed

    from .engine import run_trainer

    set_seed(options.seed)  # the adapter's initial weights too, so --seed repeats the whole run
    model, tokenizer = prepare_model(options, source, placement, tokenizer)
    folder.clear_old_run()
    prepared = prepare_examples(options, model, tokenizer, data,
                                rehearse(options, model, tokenizer, data, resuming=checkpoint is not None))
    say(describe_run(options, source, placement))
    say(prepared.describe(data.report, options.packing))
    report = ReportRun(options, data, placement, plan)
    if not options.lora:  # the base model's side, before its weights change
        report.measure_base(model, tokenizer)
    settings = engine_settings(options)
    settings.deadline = make_deadline(options, plan, checkpoint)
    run = run_trainer(model, tokenizer, prepared.train, prepared.val, settings, placement.device,
                      placement.dtype, checkpoint, teacher=prepared.teacher)
    if run.interrupted:
        say(f"Stopped early; checkpoint saved in {run.checkpoint}. Continue with the same command plus "
            f"--resume {options.output}")
        return {"interrupted": True, "checkpoint": run.checkpoint}
    if data.preferences:
        run.metrics.update(learn_preferences(options, run.trainer.model, data.preferences, settings.deadline,
                                             plan.parts.get("preferences", 0.0)))
    budget = budget_record(plan, settings.deadline, run.metrics)
    if budget is not None:
        run.metrics["time_budget"] = budget
    return finish(run, tokenizer, options, source, prepared.rehearsal, plan, report)


DPO_HELD_OUT = 0.2  # of the pairs, to measure the margin on pairs the model did not learn from (5 or more pairs)


@dataclass
class Preferences:
    """The preference pairs, tokenized: those DPO trains on and those its margin is measured on."""

    train: List[dict]
    measured: List[dict]
    where: str  # "held-out", or "training" where there are too few pairs to hold some out
    report: "PreferenceReport"

    def pair_tokens(self) -> List[int]:
        """Per training pair: the tokens of its chosen and its rejected conversation."""
        return [len(pair["chosen"][0]) + len(pair["rejected"][0]) for pair in self.train]

    @property
    def count(self) -> int:
        return len(self.train) + (len(self.measured) if self.where == "held-out" else 0)


def tokenize_preferences(options: TrainOptions, tokenizer) -> Preferences:
    from .dpo import PreferenceReport, pair_examples, read_pairs

    report = PreferenceReport()
    examples = pair_examples(read_pairs(options.preferences), tokenizer, options.max_length, options.system_prompt,
                             report)
    if not examples:
        raise ChatkitError(f"--preferences {options.preferences}: no pair fits --max-length {options.max_length}")
    # Held out by prompt: pairs that share a prompt (one chosen answer against each regeneration, or a pair
    # given twice) go to one side, so no held-out pair's chosen answer or prompt was trained on.
    groups = same_prompt_groups(examples)
    train_groups, held_groups = split_train_val(groups, DPO_HELD_OUT if len(groups) >= 5 else 0.0, options.seed)
    train, held = [e for g in train_groups for e in g], [e for g in held_groups for e in g]
    return Preferences(train, held, "held-out", report) if held else Preferences(train, train, "training", report)


def same_prompt_groups(examples: Sequence[dict]) -> List[List[dict]]:
    """The tokenized pairs grouped by their prompt (the tokens before the first labelled one), in order."""
    from .formatting import IGNORE_INDEX

    groups: dict = {}
    for example in examples:
        ids, labels = example["chosen"]
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        groups.setdefault(tuple(ids[:start]), []).append(example)
    return list(groups.values())


def preference_summary(metrics: dict) -> Optional[str]:
    if "margin_before" not in metrics:
        return None
    stopped = (f"; stopped after {metrics['dpo_steps']} of {metrics['dpo_planned_steps']} steps "
               f"({metrics['dpo_stopped']})" if metrics.get("dpo_stopped") else "")
    return (f"DPO on {metrics['preference_pairs']} pairs: the chosen-minus-rejected log-probability margin went from "
            f"{metrics['margin_before']} to {metrics['margin_after']} on {metrics['margin_pairs']} "
            f"{metrics['margin_measured_on']} pairs (it rose on {metrics['margin_rose']} of them){stopped}")


def learn_preferences(options: TrainOptions, model, preferences: Preferences, deadline=None,
                      planned_s: float = 0.0) -> dict:
    """DPO on the adapter after the supervised training, against the model that training left; the
    chosen-minus-rejected log-probability margin before and after, on held-out pairs where there are enough.
    Under a time budget the steps that would not end in time are left out; Ctrl-C leaves out the rest too
    (the model is saved with what DPO had done)."""
    from .dpo import pair_logps, preference_margins, train_dpo

    train, measured, where = preferences.train, preferences.measured, preferences.where
    model.eval()
    settings = f"beta {options.dpo_beta}, {options.dpo_epochs} epochs" + (
        f", supervised loss weighted {options.dpo_sft_weight:g}" if options.dpo_sft_weight else "")
    say(f"preferences: {preferences.report.describe()}; DPO ({settings}) on {len(train)}, margin measured on "
        f"{len(measured)} {where} pairs")
    reference = pair_logps(model, train)  # the model before DPO: also the margins before, on training pairs
    before = preference_margins(reference if measured is train else pair_logps(model, measured))
    progress = Progress(options.dpo_epochs * len(train))
    started = time.time()

    def on_step(step: int, total: int, loss: float) -> bool:
        progress.update(step, loss=loss)
        if deadline is None or step == total:
            return False
        step_s = (time.time() - started) / step
        slowdown = max(1.0, step_s * total / planned_s) if planned_s > 0 else 1.0
        return time.time() + step_s > deadline.finish_by - deadline.saving_s - deadline.report_s * slowdown

    try:
        figures = train_dpo(model, train, options.dpo_epochs, options.dpo_beta, options.dpo_learning_rate,
                            options.dpo_sft_weight, options.seed, on_step=on_step, reference=reference)
    finally:
        progress.close()
    after = preference_margins(pair_logps(model, measured))
    mean = lambda values: round(sum(values) / len(values), 3)  # noqa: E731
    figures |= {"preference_pairs": preferences.count, "margin_measured_on": where, "margin_pairs": len(measured),
                "margin_before": mean(before), "margin_after": mean(after),
                "margin_rose": sum(a > b for a, b in zip(after, before))}
    say(f"preferences: {preference_summary(figures)}")
    return figures


def report_chosen(options: TrainOptions, data: Data):
    """The user's prompts the report asks both models (none with --report none)."""
    return chosen_prompts(data.val_conversations, data.conversations) if options.report == "full" else []


def report_questions(options: TrainOptions, chosen) -> List[str]:
    """Everything the report asks both models: the `chosen` prompts of the user's, then the general questions."""
    return report_prompts(chosen) if options.report == "full" else []


def report_examples(data: Data, time_budget: Optional[str] = None):
    """The examples the loss before and after is measured on, and which split they are from (a time budget
    keeps fewer validation examples)."""
    val = data.val[:BUDGET_VAL_EXAMPLES] if time_budget else data.val
    return loss_examples(val, [e for group in data.train for e in group])


class ReportRun:
    """The report's measurements: the same examples and prompts for the base model and the trained one."""

    def __init__(self, options: TrainOptions, data: Data, placement: Placement, plan=None):
        self.options, self.data, self.placement, self.plan = options, data, placement, plan
        self.chosen = report_chosen(options, data)
        self.questions = report_questions(options, self.chosen)
        self.examples, self.loss_on = report_examples(data)  # data was cut to the budget's validation already
        self.base: Optional[Side] = None
        self.seconds = 0.0

    def _measure(self, model, tokenizer) -> Side:
        import time

        started = time.perf_counter()
        side = measure(model, tokenizer, self.questions, self.examples, self.options.system_prompt)
        self.seconds += time.perf_counter() - started
        return side

    def measure_base(self, model, tokenizer) -> None:
        from .report import adapter_off

        with adapter_off(model):
            self.base = self._measure(model, tokenizer)

    def write(self, folder: Path, model, tokenizer, source: ModelSource, metrics: dict, state, record: dict) -> str:
        """report.md, loss.png and README.md in `folder` (the model's staging folder); returns the line to print."""
        import time

        from .report import measure_both, plot_loss, summary_line, write_texts

        if self.base is None:  # LoRA: the same weights with the adapter switched off
            started = time.perf_counter()
            self.base, trained = measure_both(model, tokenizer, self.questions, self.examples,
                                              self.options.system_prompt)
            self.seconds += time.perf_counter() - started
        else:
            trained = self._measure(model, tokenizer)
        output = Path(self.options.output)
        plot_loss(state.log_history, folder / PLOT_FILE)
        facts = RunFacts(output=str(output), data_files=[Path(f).name for f in self.options.data],
                         conversations=self.data.report.conversations, examples=self.data.report.examples,
                         tokens=self.data.report.tokens, trained_tokens=self.data.report.trained_tokens,
                         base_model=public_name(source), method=self.options.method,
                         seconds=metrics.get("train_runtime_s", 0.0), device=self.placement.describe(),
                         epochs=self.options.epochs or 0, steps=state.global_step,
                         loss_on=self.loss_on, measured_examples=len(self.examples),
                         budget=(metrics.get("time_budget") or {}).get("summary"),
                         preferences=preference_summary(metrics),
                         system_prompts=system_prompts(self.data.conversations, self.options.system_prompt),
                         record=record)
        write_texts(folder, facts, self.base, trained, self.chosen, adapter=self.options.lora)
        metrics.update(report_s=round(self.seconds, 1), loss_before=self.base.loss, loss_after=trained.loss)
        summary = summary_line(self.base, trained, len(self.chosen))
        return f"Report: {output / REPORT_FILE} ({summary}; {self.seconds:.0f} s)"


def finish(run, tokenizer, options: TrainOptions, source: ModelSource, rehearsal: Rehearsal, plan=None,
           report: Optional[ReportRun] = None) -> dict:
    """Save the trained model, write its report and say where it is and how well it did."""
    from .engine import perplexity

    metrics = run.metrics
    if options.rehearsal:
        metrics.update(rehearsal_examples=len(rehearsal.conversations), rehearsal_s=round(rehearsal.seconds, 1))
    if not run.trainer.is_world_process_zero():
        return metrics
    info = run_record(tokenizer, options, source, metrics, rehearsal.conversations, plan,
                      {"trained": len(report.data.conversations), "validation": len(report.data.val_conversations)}
                      if report else None)
    with RunFolder(options).staging() as staging:  # published whole: the model, its report and its record
        save_model(staging, run.trainer.model, tokenizer, options, info)
        reported = report.write(staging, run.trainer.model, tokenizer, source, metrics, run.trainer.state,
                                info["reproducibility"]) if report else ""
        write_training_info(staging, info)
    summary = f"train loss {metrics['train_loss']} (perplexity {perplexity(metrics['train_loss'])})"
    if "eval_loss" in metrics:
        summary += f", validation loss {metrics['eval_loss']} (perplexity {metrics['eval_perplexity']})"
    merged = f" (standalone merged copy in {Path(options.output) / 'merged'})" if options.merge and options.lora else ""
    if (metrics.get("time_budget") or {}).get("changes"):
        summary += f"; time budget kept: {metrics['time_budget']['summary']}"
    say(f"\nDone in {metrics['train_runtime_s']:.0f} s: {summary}.\nModel saved in {options.output}{merged}"
        + (f"\n{reported}" if reported else "")
        + f"\nTalk to it:  python demo_chatbot.py {options.output}"
        f"\nTensorBoard: tensorboard --logdir {Path(options.output) / RUNS}")
    if options.push_to_hub:
        push_to_hub(options)
    return metrics
