"""Fine-tuning a causal chat model on conversations with transformers' Trainer (LoRA, QLoRA or full)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import __version__
from .datasets import default_val_split, read_conversations, split_train_val
from .device import Placement, choose_placement
from .errors import ChatkitError
from .formatting import (IGNORE_INDEX, ensure_chat_template, ensure_pad_token, tokenize_conversation,
                         with_system_prompt)
from .models import TRAINING_INFO_FILE, ModelSource, causal_lm_parts, load_model, resolve_model
from .rehearsal import attach_teacher, auto_count, rehearsal_conversations

CHECKPOINTS = "checkpoints"
RUNS = "runs"


@dataclass
class TrainOptions:
    """Every training setting; the script's flags and --config keys have the same names."""

    data: List[str]
    model: Optional[str] = None  # None: the starter model
    output: str = "./chat-model"
    epochs: Optional[float] = None  # None: see auto_schedule
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # 0.05 costs 20% of CPU throughput (docs/PERFORMANCE.md)
    lora_target_modules: str = "all-linear"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    learning_rate: Optional[float] = None  # None: 1e-3 with LoRA, 2e-5 for full fine-tuning
    batch_size: Optional[int] = None  # None: see auto_schedule
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    val_split: Optional[float] = None  # None: 0.1 with 10 or more conversations, else 0
    eval_steps: Optional[int] = None  # None: once per epoch
    save_steps: Optional[int] = None  # None: once per epoch
    logging_steps: int = 5
    early_stopping_patience: Optional[int] = None
    resume: Optional[str] = None
    seed: int = 42
    gradient_checkpointing: bool = False
    packing: bool = False
    merge: bool = False
    system_prompt: Optional[str] = None
    rehearsal: Optional[int] = None  # None: see rehearsal.auto_count
    neftune_alpha: float = 0.0  # noise on the input embeddings while training (0: off)
    train_on_prompt: bool = False
    overwrite: bool = False
    device: Optional[str] = None
    dtype: Optional[str] = None
    trust_remote_code: bool = False
    push_to_hub: bool = False
    hub_name: Optional[str] = None

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-3 if self.lora else 2e-5

    def problems(self) -> List[str]:
        """Every inconsistency, named by flag, so one run reports them all."""
        found = []
        if self.load_in_4bit and self.load_in_8bit:
            found.append("--load-in-4bit and --load-in-8bit: choose one")
        if (self.load_in_4bit or self.load_in_8bit) and not self.lora:
            found.append("--load-in-4bit/--load-in-8bit train a LoRA adapter: drop --no-lora")
        if self.push_to_hub and not self.hub_name:
            found.append("--push-to-hub needs --hub-name USER/NAME")
        if self.val_split is not None and not 0 <= self.val_split < 1:
            found.append("--val-split must be at least 0 and below 1")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "max_length", "lora_r", "logging_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                found.append(f"--{name.replace('_', '-')} must be positive")
        if self.learning_rate is not None and self.learning_rate <= 0:
            found.append("--learning-rate must be positive")
        if self.rehearsal is not None and self.rehearsal < 0:
            found.append("--rehearsal must be 0 (off) or more")
        if self.neftune_alpha < 0:
            found.append("--neftune-alpha must be 0 (off) or more")
        if self.max_length < 16:
            found.append("--max-length must be at least 16 tokens")
        return found


# The automatic schedule: small personal data sets need many small updates to be learned, large ones
# few passes (docs/PERFORMANCE.md, "Teaching facts and style").
AUTO_MAX_BATCH = 8
AUTO_MIN_STEPS_PER_EPOCH = 16
AUTO_TARGET_STEPS = 140  # optimizer updates the schedule aims for
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 3, 20


def auto_schedule(options: TrainOptions, examples: int) -> TrainOptions:
    """Fill in batch size and epochs left unset, from the number of training examples.

    Batch: up to 8, but small enough for at least 16 steps per epoch. Epochs: enough for about 140
    optimizer updates, at least 3 and at most 20 passes over the data.
    """
    batch = options.batch_size or max(1, min(AUTO_MAX_BATCH, examples // AUTO_MIN_STEPS_PER_EPOCH))
    epochs = options.epochs
    if epochs is None:
        steps_per_epoch = max(1, math.ceil(examples / (batch * options.gradient_accumulation_steps)))
        epochs = float(min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, math.ceil(AUTO_TARGET_STEPS / steps_per_epoch))))
    return dataclasses.replace(options, batch_size=batch, epochs=epochs)


# ---------------------------------------------------------------------------------------------
# Data -> token examples


@dataclass
class ExampleReport:
    conversations: int = 0
    examples: int = 0
    split_conversations: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0
    trained_tokens: int = 0


def _segments(messages: List[dict]) -> Tuple[Optional[dict], List[List[dict]]]:
    """The system message (if any) and the exchanges: each a user turn with the assistant turn after it."""
    system = messages[0] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system else messages
    exchanges, current = [], []
    for message in turns:
        if message["role"] == "user" and current:
            exchanges.append(current)
            current = []
        current.append(message)
    if current:
        exchanges.append(current)
    return system, exchanges


def tokenize_examples(conversations: Sequence[List[dict]], tokenizer, options: TrainOptions,
                      report: ExampleReport) -> List[Dict[str, list]]:
    """Token ids and labels per conversation; ones over --max-length are split between exchanges."""
    examples = []
    for messages in conversations:
        report.conversations += 1
        messages = with_system_prompt(messages, options.system_prompt)
        ids, labels = tokenize_conversation(messages, tokenizer, options.train_on_prompt)
        if len(ids) <= options.max_length:
            pieces = [(ids, labels)]
        else:
            report.split_conversations += 1
            pieces = _split_long(messages, tokenizer, options, report)
        for ids, labels in pieces:
            if all(label == IGNORE_INDEX for label in labels):
                report.dropped["with no trained token"] += 1
                continue
            examples.append({"input_ids": ids, "labels": labels, "length": len(ids)})
            report.tokens += len(ids)
            report.trained_tokens += sum(1 for label in labels if label != IGNORE_INDEX)
    report.examples = len(examples)
    return examples


def _split_long(messages, tokenizer, options: TrainOptions, report: ExampleReport):
    """Greedy runs of whole exchanges that fit, each with the system message; never cut mid-answer."""
    system, exchanges = _segments(messages)
    head = [system] if system else []
    pieces, run = [], []
    for exchange in exchanges:
        candidate = head + run + exchange
        ids, labels = tokenize_conversation(candidate, tokenizer, options.train_on_prompt)
        if len(ids) <= options.max_length:
            run, best = run + exchange, (ids, labels)
            continue
        if run:
            pieces.append(best)
        ids, labels = tokenize_conversation(head + exchange, tokenizer, options.train_on_prompt)
        if len(ids) <= options.max_length:
            run, best = list(exchange), (ids, labels)
        else:
            report.dropped["exchanges longer than --max-length on their own"] += 1
            run = []
    if run:
        pieces.append(best)
    return pieces


class PaddingCollator:
    """Pads a batch to its longest example (never to a fixed length).

    With packing, examples carry position_ids that restart at each conversation and there is no
    attention mask: transformers then builds a block-diagonal mask so conversations cannot see each other.
    """

    def __init__(self, pad_token_id: int, packed: bool = False):
        self.pad_token_id = pad_token_id
        self.packed = packed

    def __call__(self, batch: List[dict]) -> dict:
        import torch

        width = max(len(example["input_ids"]) for example in batch)
        input_ids, labels, mask, positions, teacher = [], [], [], [], []
        taught = "teacher_index" in batch[0]
        for example in batch:
            length = len(example["input_ids"])
            pad = width - length
            input_ids.append(list(example["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(example["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * length + [0] * pad)
            if self.packed:
                positions.append(list(example["position_ids"]) + list(range(pad)))
            if taught:
                teacher.append(list(example["teacher_index"]) + [-1] * pad)
        # No key/value cache in training: it is never read, and with one transformers would not
        # detect packed sequences (it builds the block-diagonal mask only for cache-free forwards).
        out = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "use_cache": False}
        if taught:
            out["teacher_index"] = torch.tensor(teacher)
        if self.packed:
            out["position_ids"] = torch.tensor(positions)
        else:
            out["attention_mask"] = torch.tensor(mask)
        return out


def pack_examples(examples: List[dict], max_length: int) -> List[dict]:
    """First-fit-decreasing bins of whole examples up to max_length tokens, with restarting positions."""
    bins: List[List[dict]] = []
    sizes: List[int] = []
    for example in sorted(examples, key=lambda e: -len(e["input_ids"])):
        size = len(example["input_ids"])
        for index, used in enumerate(sizes):
            if used + size <= max_length:
                bins[index].append(example)
                sizes[index] += size
                break
        else:
            bins.append([example])
            sizes.append(size)
    taught = any("teacher_index" in example for example in examples)
    packed = []
    for group in bins:
        ids, labels, positions, teacher = [], [], [], []
        for example in group:
            ids += example["input_ids"]
            # The first token of a conversation is never predicted from the one before it.
            labels += [IGNORE_INDEX] + list(example["labels"][1:])
            positions += list(range(len(example["input_ids"])))
            teacher += example.get("teacher_index") or [-1] * len(example["input_ids"])
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions, "length": len(ids)})
        if taught:
            packed[-1]["teacher_index"] = teacher
    return packed


# ---------------------------------------------------------------------------------------------
# The run


def _print(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def check_output_dir(options: TrainOptions) -> None:
    output = Path(options.output)
    if options.resume or options.overwrite or not output.exists():
        return
    markers = ("adapter_config.json", "config.json", TRAINING_INFO_FILE, CHECKPOINTS)
    if any((output / marker).exists() for marker in markers):
        raise ChatkitError(
            f"--output {output} already holds a trained model; pass --overwrite to replace it, "
            f"--resume to continue its run, or another --output"
        )


def find_checkpoint(options: TrainOptions) -> Optional[str]:
    """The newest checkpoint under --resume DIR (a checkpoint itself, or an output directory)."""
    if not options.resume:
        return None
    where = Path(options.resume)
    if (where / "trainer_state.json").is_file():
        return str(where)
    for folder in (where / CHECKPOINTS, where):
        found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
        if found:
            return str(found[-1])
    raise ChatkitError(f"--resume {options.resume}: no checkpoint-* folder found there to resume from")


def quantization_config(options: TrainOptions, placement: Placement):
    if not (options.load_in_4bit or options.load_in_8bit):
        return None
    if not placement.device.startswith("cuda"):
        raise ChatkitError(
            "--load-in-4bit/--load-in-8bit (QLoRA) need an NVIDIA GPU with CUDA (bitsandbytes); "
            f"this run is on {placement.device}. Drop the flag to train LoRA in full precision"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ChatkitError(f"QLoRA needs bitsandbytes: pip install bitsandbytes ({exc})") from None
    if options.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=placement.torch_dtype)


def prepare_model(options: TrainOptions, source: ModelSource, placement: Placement):
    """Load the model and tokenizer, and wrap the model with LoRA unless training it whole."""
    loaded = load_model(source, placement, trust_remote_code=options.trust_remote_code,
                        quantization_config=quantization_config(options, placement),
                        adapter_trainable=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    if options.gradient_checkpointing:
        model.config.use_cache = False
    if options.lora and source.kind != "adapter":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if options.load_in_4bit or options.load_in_8bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
        targets = options.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=targets, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:
            raise ChatkitError(f"--lora-target-modules {options.lora_target_modules}: {exc}") from None
    return model, tokenizer


class _StopOnInterrupt:
    """First Ctrl-C: finish the current step, save a checkpoint and stop. Second Ctrl-C: stop now."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            _print("\nInterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)...")

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _callbacks(options: TrainOptions, interrupt: _StopOnInterrupt, has_val: bool):
    from transformers import EarlyStoppingCallback, TrainerCallback
    from transformers.integrations import TensorBoardCallback

    class Throughput(TrainerCallback):
        """Adds trained tokens per second to each log line (and so to TensorBoard)."""

        def __init__(self):
            self.last = (time.perf_counter(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs:
                return
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            elapsed = now - self.last[0]
            if elapsed > 0:
                logs["tokens_per_second"] = round((seen - self.last[1]) / elapsed, 1)
            self.last = (now, seen)

    class LossInProgressBar(TrainerCallback):
        """Shows the latest loss beside the progress bar's ETA (run_trainer hands it the bar's owner)."""

        progress = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            bar = getattr(self.progress, "training_bar", None)
            if bar is not None and logs and "loss" in logs:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if interrupt.requested:
                control.should_save = True
                control.should_training_stop = True

    callbacks = [Throughput(), LossInProgressBar(), Interrupt()]
    try:
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(options.output) / RUNS))))
    except ImportError:
        _print("warning: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)")
    if options.early_stopping_patience and has_val:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=options.early_stopping_patience))
    return callbacks


def make_trainer_class():
    """transformers' Trainer, computing the output layer only at positions that carry a label.

    The output layer (hidden size x vocabulary, 49k wide for the starter model) and the softmax over
    it are the largest single cost per token; prompt tokens and padding have no label, so their logits
    are never needed. Models with logit soft-capping or scaling, and distributed runs (where the
    forward must go through the DDP wrapper), take the model's full forward instead.

    Rehearsal positions (a batch's `teacher_index`, with the table in `trainer.teacher`) are trained
    towards the model's own earlier distribution (KL divergence) instead of the token in the text.
    Evaluation keeps transformers' loss, which is the same cross-entropy.
    """
    import torch
    from transformers import Trainer

    from .rehearsal import teacher_loss

    class ChatTrainer(Trainer):
        teacher = None

        def _labelled_logits(self, model, inputs, keep):
            causal_lm, inner = causal_lm_parts(model)
            config = causal_lm.config
            plain = not any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
            head = causal_lm.get_output_embeddings()
            if plain and inner is not None and head is not None and self.args.world_size == 1:
                # PaddingCollator pads on the right, so in a causal model no real token can see padding:
                # without the mask, attention takes its plain causal path instead of a materialised mask.
                forward = {k: v for k, v in inputs.items() if k not in ("labels", "attention_mask")}
                hidden = inner(**forward).last_hidden_state
                return head(hidden[:, :-1][keep]).float()
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            return model(**forward).logits[:, :-1][keep].float()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher_index = inputs.pop("teacher_index", None)
            if return_outputs or (self.args.world_size > 1 and teacher_index is None):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            targets = inputs["labels"][:, 1:]
            keep = targets != IGNORE_INDEX
            logits = self._labelled_logits(model, inputs, keep)
            targets = targets[keep]
            rows = teacher_index[:, 1:][keep] if teacher_index is not None else None
            if rows is None or not bool((rows >= 0).any()):
                loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            else:
                taught = rows >= 0
                loss = torch.nn.functional.cross_entropy(logits[~taught], targets[~taught], reduction="sum")
                loss = loss + teacher_loss(logits[taught], self.teacher, rows[taught])
            count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
            if isinstance(count, torch.Tensor):
                count = count.to(loss.device)
            loss = loss / count
            if self.args.world_size > 1 and self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: the count is global
            return loss

    return ChatTrainer


def training_arguments(options: TrainOptions, placement: Placement, has_val: bool):
    from transformers import TrainingArguments

    per_epoch = options.eval_steps is None and options.save_steps is None
    strategy = "epoch" if per_epoch else "steps"
    save_steps = options.save_steps or options.eval_steps or 500
    eval_steps = options.eval_steps or save_steps
    on_cuda = placement.device.startswith("cuda")
    return TrainingArguments(
        output_dir=str(Path(options.output) / CHECKPOINTS),
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.effective_learning_rate,
        lr_scheduler_type=options.lr_scheduler,
        warmup_steps=options.warmup_ratio,  # below 1: a fraction of all steps
        weight_decay=options.weight_decay,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        eval_strategy=strategy if has_val else "no",
        eval_steps=eval_steps if has_val and not per_epoch else None,
        save_strategy=strategy,
        save_steps=save_steps if not per_epoch else None,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        use_cpu=placement.device == "cpu",
        bf16=on_cuda and placement.dtype == "bfloat16",
        fp16=on_cuda and placement.dtype == "float16",
        gradient_checkpointing=options.gradient_checkpointing,
        report_to="none",  # TensorBoard is added as a callback writing to OUTPUT/runs
        seed=options.seed,
        data_seed=options.seed,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",  # counts the real tokens of each step
        train_sampling_strategy="random" if options.packing else "group_by_length",
        length_column_name="length",
        dataloader_pin_memory=on_cuda,
        ddp_find_unused_parameters=False,
        neftune_noise_alpha=options.neftune_alpha or None,
    )


def describe_options(options: TrainOptions, source: ModelSource, placement: Placement) -> str:
    method = "full fine-tuning" if not options.lora else (
        "QLoRA 4-bit" if options.load_in_4bit else "QLoRA 8-bit" if options.load_in_8bit else "LoRA")
    lines = [f"model:    {source.describe()}", f"device:   {placement.describe()}", f"method:   {method}"]
    for key, value in dataclasses.asdict(options).items():
        if key in ("model", "device", "dtype"):
            continue
        if key == "learning_rate":
            value = options.effective_learning_rate
        lines.append(f"  {key.replace('_', '-')}: {value}")
    return "\n".join(lines)


def _base_model_spec(source: ModelSource) -> str:
    """How a trained adapter names its base: friendly names and Hub ids as typed, local paths absolute."""
    base = source.base if source.kind == "adapter" else source
    return os.path.abspath(base.spec) if os.path.exists(os.path.expanduser(base.spec)) else base.spec


def save_model(trainer, tokenizer, options: TrainOptions, source: ModelSource, metrics: dict,
               rehearsed: Sequence[List[dict]] = ()) -> None:
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    info = {
        "created_by": f"chatkit {__version__}",
        "base_model": _base_model_spec(source) if options.lora else None,
        "method": "lora" if options.lora else "full",
        "chat_template": tokenizer.chat_template,
        "system_prompt": options.system_prompt,
        "options": dataclasses.asdict(options) | {"learning_rate": options.effective_learning_rate},
        "metrics": metrics,
        "rehearsal": list(rehearsed),  # the general prompts and own answers trained alongside the data
    }
    (output / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if options.merge and options.lora:
        merged_dir = output / "merged"
        _print(f"Writing a standalone merged model to {merged_dir} ...")
        merged = load_model(str(output), choose_placement("cpu", "float32")).model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        merged_info = dict(info, base_model=None, method="lora-merged")
        (merged_dir / TRAINING_INFO_FILE).write_text(json.dumps(merged_info, indent=2) + "\n", encoding="utf-8")


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
    _print(f"Pushed to https://huggingface.co/{options.hub_name} (private)")


@dataclass
class RunResult:
    """What a Trainer run left: the trainer (with the best model loaded) and its figures."""

    trainer: object
    metrics: dict
    interrupted: bool = False
    checkpoint: Optional[str] = None


def run_trainer(model, tokenizer, train_examples: List[dict], val_examples: List[dict], options: TrainOptions,
                placement: Placement, checkpoint: Optional[str] = None, evaluate_first: bool = False,
                teacher=None) -> RunResult:
    """Train on token examples (packed already when options.packing) with transformers' Trainer.

    Ctrl-C saves a checkpoint; running out of GPU memory is explained."""
    from datasets import Dataset

    collator = PaddingCollator(tokenizer.pad_token_id, packed=options.packing)
    has_val = bool(val_examples)
    interrupt = _StopOnInterrupt()
    trainer = make_trainer_class()(
        model=model,
        args=training_arguments(options, placement, has_val),
        data_collator=collator,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(val_examples) if has_val else None,
        processing_class=tokenizer,
        callbacks=_callbacks(options, interrupt, has_val),
    )
    trainer.teacher = teacher
    from transformers.trainer_callback import ProgressCallback

    progress = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "LossInProgressBar":
            callback.progress = progress
    metrics = {}
    if evaluate_first and has_val:
        with contextlib.redirect_stdout(sys.stderr):
            metrics["eval_loss_before"] = round(trainer.evaluate()["eval_loss"], 4)
    try:
        # The Trainer prints its log lines on stdout; scripts keep stdout for results.
        with interrupt, contextlib.redirect_stdout(sys.stderr):
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            raise ChatkitError(
                "the GPU ran out of memory; lower --batch-size (and raise --gradient-accumulation-steps to "
                "keep the effective batch), lower --max-length, add --gradient-checkpointing, or use "
                "--load-in-4bit"
            ) from None
        raise
    if interrupt.requested:
        latest = find_checkpoint(dataclasses.replace(options, resume=options.output))
        return RunResult(trainer, metrics, interrupted=True, checkpoint=latest)
    runtime = result.metrics.get("train_runtime", 0.0)
    tokens = trainer.state.num_input_tokens_seen
    metrics.update(train_loss=round(result.training_loss, 4), steps=result.global_step,
                   train_runtime_s=round(runtime, 1), tokens_seen=tokens,
                   tokens_per_second=round(tokens / runtime, 1) if runtime else None)
    if has_val:
        with contextlib.redirect_stdout(sys.stderr):
            eval_loss = trainer.evaluate()["eval_loss"]
        metrics.update(eval_loss=round(eval_loss, 4), eval_perplexity=perplexity(eval_loss))
    return RunResult(trainer, metrics)


def perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50)), 2)


def print_interrupted(run: RunResult, options: TrainOptions, command: str = "the same command") -> None:
    _print(f"Stopped early; checkpoint saved in {run.checkpoint}. Continue with {command} plus "
           f"--resume {options.output}")


def train(options: TrainOptions) -> dict:
    """The whole run: data, model, Trainer, best checkpoint, saving. Returns the final metrics."""
    problems = options.problems()
    if problems:
        raise ChatkitError("; ".join(problems))
    check_output_dir(options)
    checkpoint = find_checkpoint(options)
    placement = choose_placement(options.device, options.dtype)
    source = resolve_model(options.model)
    quantization_config(options, placement)  # fail before loading anything when QLoRA cannot run

    conversations, data_report = read_conversations(options.data)
    _print(data_report.describe())
    val_split = options.val_split if options.val_split is not None else default_val_split(len(conversations))
    train_convs, val_convs = split_train_val(conversations, val_split, options.seed)

    from transformers import set_seed

    set_seed(options.seed)  # the adapter's initial weights too, so --seed repeats the whole run
    model, tokenizer = prepare_model(options, source, placement)
    report = ExampleReport()
    train_examples = tokenize_examples(train_convs, tokenizer, options, report)
    val_examples = tokenize_examples(val_convs, tokenizer, options, ExampleReport())
    if report.trained_tokens == 0:
        raise ChatkitError(
            f"{', '.join(options.data)}: no token would be trained (the assistant turns are empty or cut); "
            "check the data, raise --max-length, or pass --train-on-prompt"
        )
    count = options.rehearsal if options.rehearsal is not None else auto_count(len(conversations))
    options = dataclasses.replace(options, rehearsal=count)
    like = [m["content"] for c in train_convs for m in c if m["role"] == "user"]
    rehearsal = rehearsal_conversations(model, tokenizer, count, options.system_prompt, like=like)
    teacher = None
    if count:
        _print(rehearsal.describe())
    if rehearsal.conversations:
        rehearsal_examples = tokenize_examples(rehearsal.conversations, tokenizer, options, ExampleReport())
        teacher = attach_teacher(model, rehearsal_examples)
        for example in train_examples:
            example["teacher_index"] = [-1] * len(example["input_ids"])
        train_examples += rehearsal_examples
    if options.packing:
        train_examples = pack_examples(train_examples, options.max_length)
        val_examples = pack_examples(val_examples, options.max_length) if val_examples else []
    options = auto_schedule(options, len(train_examples))
    _print(describe_options(options, source, placement))
    _print(f"training on {report.examples} examples ({report.trained_tokens} trained of {report.tokens} tokens)"
           + (f" and {len(rehearsal.conversations)} rehearsal examples" if rehearsal.conversations else "")
           + (f" packed into {len(train_examples)} sequences" if options.packing else "")
           + (f", {len(val_examples)} for validation" if val_examples else ", no validation split")
           + (f"; {report.split_conversations} long conversations split between exchanges" if report.split_conversations else "")
           + "".join(f"; dropped {n} {why}" for why, n in report.dropped.items()))

    run = run_trainer(model, tokenizer, train_examples, val_examples, options, placement, checkpoint,
                      teacher=teacher)
    if run.interrupted:
        print_interrupted(run, options)
        return {"interrupted": True, "checkpoint": run.checkpoint}
    metrics = run.metrics
    if count:
        metrics.update(rehearsal_examples=len(rehearsal.conversations), rehearsal_s=round(rehearsal.seconds, 1))
    if run.trainer.is_world_process_zero():
        save_model(run.trainer, tokenizer, options, source, metrics, rehearsal.conversations)
        summary = f"train loss {metrics['train_loss']} (perplexity {perplexity(metrics['train_loss'])})"
        if "eval_loss" in metrics:
            summary += f", validation loss {metrics['eval_loss']} (perplexity {metrics['eval_perplexity']})"
        _print(f"\nDone: {summary}.\nModel saved in {options.output}"
               + (f" (standalone merged copy in {Path(options.output) / 'merged'})" if options.merge and options.lora else "")
               + f"\nTalk to it:  python demo_chatbot.py {options.output}"
               + f"\nTensorBoard: tensorboard --logdir {Path(options.output) / RUNS}")
        if options.push_to_hub:
            push_to_hub(options)
    return metrics
