"""The training engine: ChatTrainer (transformers' Trainer with a labelled-positions loss and rehearsal),
its arguments and callbacks (callbacks.py) and one run over token examples.

Imported only when training starts: it imports torch and transformers at the top.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .callbacks import (Deadline, Interrupt, KeepDeadline, ProgressReport, ReturnFreedMemory, StopOnInterrupt,
                        Throughput, perplexity)
from .errors import ChatkitError
from .examples import PaddingCollator, TokenBudgetSampler
from .files import latest_checkpoint
from .formatting import IGNORE_INDEX, pad_token_id
from .forward import cross_entropy_sum, finite, labelled_features
from .output import quiet_transformers, say
from .rehearsal import teacher_loss

# transformers renamed gradient checkpointing to activation checkpointing (the old name warns).
CHECKPOINTING_ARGUMENT = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                          else "gradient_checkpointing")


@dataclass
class ChatTrainingArguments(TrainingArguments):
    """The trainer's one configuration: transformers' TrainingArguments and what ChatTrainer adds to them, as
    TRL's SFTConfig is one. Built once for a run (`for_run`) and handed to the trainer as it is."""

    max_batch_tokens: Optional[int] = field(default=None, metadata={
        "help": "padded tokens a step holds at most (batches by a token budget); None: batches of the batch size"})
    packing: bool = field(default=False, metadata={"help": "examples packed into sequences of --max-length"})
    early_stopping_patience: Optional[int] = field(default=None, metadata={
        "help": "stop after this many evaluations without a better validation loss"})
    logs_dir: Optional[str] = field(default=None, metadata={"help": "TensorBoard event files; None: none written"})

    @classmethod
    def for_run(cls, *, checkpoints_dir: str, epochs: float, batch_size: int, learning_rate: float, device: str,
                dtype: str, has_val: bool, gradient_accumulation_steps: int = 1, lr_scheduler: str = "cosine",
                warmup_ratio: float = 0.05, weight_decay: float = 0.0, logging_steps: int = 5,
                eval_steps: Optional[int] = None, save_steps: Optional[int] = None, seed: int = 42,
                gradient_checkpointing: bool = False, neftune_alpha: float = 0.0,
                **chat) -> "ChatTrainingArguments":
        """The arguments of one run on `device` in `dtype`: evaluation and saving once an epoch unless steps are
        given, the best checkpoint kept and loaded at the end where there is a validation split, logs and
        progress by the toolkit's own callbacks. `chat`: the fields above."""
        per_epoch = eval_steps is None and save_steps is None
        strategy = "epoch" if per_epoch else "steps"
        save_steps = save_steps or eval_steps or 500
        on_cuda = device.startswith("cuda")
        return cls(
            output_dir=checkpoints_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=learning_rate,
            lr_scheduler_type=lr_scheduler,
            warmup_steps=warmup_ratio,  # below 1: a fraction of all steps (transformers 5)
            weight_decay=weight_decay,
            logging_steps=logging_steps,
            logging_first_step=True,
            eval_strategy=strategy if has_val else "no",
            eval_steps=(eval_steps or save_steps) if has_val and not per_epoch else None,
            save_strategy=strategy,
            save_steps=save_steps if not per_epoch else None,
            save_total_limit=2,  # the newest and the best: enough to resume and to keep the best model
            load_best_model_at_end=has_val,
            metric_for_best_model="eval_loss" if has_val else None,
            greater_is_better=False if has_val else None,
            use_cpu=device == "cpu",
            bf16=on_cuda and dtype == "bfloat16",
            fp16=on_cuda and dtype == "float16",
            **{CHECKPOINTING_ARGUMENT: gradient_checkpointing},
            report_to="none",  # TensorBoard is added as a callback writing to logs_dir
            disable_tqdm=True,  # ProgressReport shows the progress instead
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",  # counts the real tokens of each step
            train_sampling_strategy="random" if chat.get("packing") else "group_by_length",
            length_column_name="length",
            dataloader_pin_memory=on_cuda,
            ddp_find_unused_parameters=False,
            neftune_noise_alpha=neftune_alpha or None,
            prediction_loss_only=True,  # validation needs the loss alone (ChatTrainer.prediction_step)
            **chat,
        )


class ChatTrainer(Trainer):
    """transformers' Trainer, computing the output layer only at positions that carry a label
    (chatkit/forward.py: the fused output layer and loss, the path validation, the report and DPO take too).

    Rehearsal positions (a batch's `teacher_index`, with the table in `self.teacher`) are trained
    towards the model's own earlier distribution (KL divergence) instead of the token in the text.
    Validation takes the same labelled-positions path (prediction_step), for the loss alone.
    """

    teacher = None
    batch_sampler = None  # a TokenBudgetSampler: batches by a token budget instead of a fixed size
    eval_batch_sampler = None

    def __init__(self, *args, teacher=None, batch_sampler=None, eval_batch_sampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.batch_sampler, self.eval_batch_sampler = teacher, batch_sampler, eval_batch_sampler

    def _budget_loader(self, dataset, sampler):
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    def get_train_dataloader(self):
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        return self._budget_loader(self.train_dataset, self.batch_sampler)

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_batch_sampler is None or eval_dataset is not None:
            return super().get_eval_dataloader(eval_dataset)
        return self._budget_loader(self.eval_dataset, self.eval_batch_sampler)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation loss through the same labelled-positions path as training: no vocabulary-wide logits
        for every position, which would be the largest allocation of the whole run."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_index = inputs.pop("teacher_index", None)
        if return_outputs or (self.args.world_size > 1 and teacher_index is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets = inputs["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        # The fused path needs the body and the head alone; the ranks of a distributed run go through DDP.
        features, head = labelled_features(model, {k: v for k, v in inputs.items() if k != "labels"}, keep,
                                           fused=self.args.world_size == 1)
        targets = targets[keep]
        rows = teacher_index[:, 1:][keep] if teacher_index is not None else None
        taught = rows >= 0 if rows is not None and bool((rows >= 0).any()) else None
        if taught is None:
            loss = cross_entropy_sum(features, head, targets)
        else:
            loss = cross_entropy_sum(features[~taught], head, targets[~taught])
            logits = features[taught] if head is None else head(features[taught]).float()
            loss = loss + teacher_loss(logits, self.teacher, rows[taught])
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        if isinstance(count, torch.Tensor):
            count = count.to(loss.device)
        loss = loss / count
        if self.args.world_size > 1 and self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: the count is global
        return finite(loss, f"step {self.state.global_step + 1}" if model.training else "validation")


TRIM_ABOVE_TOKENS = 512  # steps this large fragment the heap; smaller ones never need a trim


def make_callbacks(args: ChatTrainingArguments, stop: StopOnInterrupt, has_val: bool, step_tokens: int = 0,
                   deadline: Optional[Deadline] = None) -> List[TrainerCallback]:
    callbacks = [Throughput(), ProgressReport(), Interrupt(stop)]
    if deadline is not None:
        callbacks.insert(0, KeepDeadline(deadline))  # before the progress display, which shows the new total
    if step_tokens > TRIM_ABOVE_TOKENS:
        callbacks.append(ReturnFreedMemory())
    if args.logs_dir:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=args.logs_dir)))
        except ImportError:
            say("warning: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)")
    if args.early_stopping_patience and has_val:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    return callbacks


# ---------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    """What a Trainer run left: the trainer (with the best model loaded) and its figures."""

    trainer: ChatTrainer
    metrics: dict
    interrupted: bool = False
    checkpoint: Optional[str] = None


def largest_step(examples: List[dict], args: ChatTrainingArguments) -> int:
    """The most padded tokens one step can hold."""
    longest = max((len(e["input_ids"]) for e in examples), default=0)
    step = longest * args.per_device_train_batch_size
    return max(longest, min(step, args.max_batch_tokens)) if args.max_batch_tokens else step


def budget_sampler(examples: List[dict], args: ChatTrainingArguments) -> Optional[TokenBudgetSampler]:
    """Batches by token budget where the budget would bind; else None (the Trainer's own length grouping)."""
    lengths = [len(e["input_ids"]) for e in examples]
    if not lengths or max(lengths) * args.per_device_train_batch_size <= args.max_batch_tokens:
        return None
    return TokenBudgetSampler(lengths, args.per_device_train_batch_size, args.max_batch_tokens, args.seed)


def make_trainer(model, tokenizer, train_examples: List[dict], val_examples: List[dict], args: ChatTrainingArguments,
                 stop: StopOnInterrupt, teacher=None, deadline: Optional[Deadline] = None) -> ChatTrainer:
    from datasets import Dataset

    quiet_transformers()
    has_val = bool(val_examples)
    by_tokens = bool(args.max_batch_tokens) and not args.packing  # batches by a token budget
    trainer = ChatTrainer(
        model=model,
        args=args,
        data_collator=PaddingCollator(pad_token_id(tokenizer), packed=args.packing),
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(val_examples) if has_val else None,
        processing_class=tokenizer,
        callbacks=make_callbacks(args, stop, has_val, largest_step(train_examples, args), deadline),
        teacher=teacher, batch_sampler=budget_sampler(train_examples, args) if by_tokens else None,
        eval_batch_sampler=budget_sampler(val_examples, args) if by_tokens and has_val else None,
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer


def run_trainer(model, tokenizer, train_examples: List[dict], val_examples: List[dict], args: ChatTrainingArguments,
                checkpoint: Optional[str] = None, evaluate_first: bool = False, teacher=None,
                deadline: Optional[Deadline] = None) -> RunResult:
    """Train on token examples (packed already when args.packing) with ChatTrainer, keeping `deadline`.

    Ctrl-C saves a checkpoint; running out of GPU memory is explained."""
    stop = StopOnInterrupt()
    trainer = make_trainer(model, tokenizer, train_examples, val_examples, args, stop, teacher, deadline)
    has_val = bool(val_examples)
    metrics = {}
    # The Trainer prints on stdout; scripts keep stdout for results.
    with contextlib.redirect_stdout(sys.stderr):
        if evaluate_first and has_val:
            metrics["eval_loss_before"] = round(trainer.evaluate()["eval_loss"], 4)
        try:
            with stop:
                result = trainer.train(resume_from_checkpoint=checkpoint)
        except torch.cuda.OutOfMemoryError:
            raise ChatkitError(
                "the GPU ran out of memory; lower --batch-size (and raise --gradient-accumulation-steps to "
                "keep the effective batch), lower --max-length, give a --max-memory below the plan's (it then "
                "checkpoints and takes fewer tokens a step), or use --load-in-4bit"
            ) from None
        if stop.requested:
            return RunResult(trainer, metrics, interrupted=True, checkpoint=latest_checkpoint(args.output_dir))
        runtime = result.metrics.get("train_runtime", 0.0)
        tokens = trainer.state.num_input_tokens_seen
        metrics.update(train_loss=round(result.training_loss, 4), steps=result.global_step,
                       train_runtime_s=round(runtime, 1), tokens_seen=tokens,
                       tokens_per_second=round(tokens / runtime, 1) if runtime else None)
        if has_val:
            # The best checkpoint was loaded at the end; its validation loss is known without another pass.
            eval_loss = trainer.state.best_metric
            if eval_loss is None:
                eval_loss = trainer.evaluate()["eval_loss"]
            metrics.update(eval_loss=round(eval_loss, 4), eval_perplexity=perplexity(eval_loss))
    return RunResult(trainer, metrics)
