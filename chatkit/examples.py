"""Conversations and texts into token examples: labels, splitting long ones, text blocks, packing, batching."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .errors import ChatkitError
from .formatting import IGNORE_INDEX, fit_to_template, split_exchanges, tokenize_conversation, with_system_prompt


@dataclass
class ExampleReport:
    """What tokenizing produced: counts, and what was dropped and why."""

    conversations: int = 0
    examples: int = 0
    split_conversations: int = 0
    cut_exchanges: int = 0  # exchanges longer than --max-length, trained on their first part
    dropped: Counter = field(default_factory=Counter)
    fitted: Counter = field(default_factory=Counter)  # conversations changed to fit the chat template, per change
    tokens: int = 0
    trained_tokens: int = 0

    def describe(self) -> str:
        text = f"{self.examples} examples ({self.trained_tokens} trained of {self.tokens} tokens)"
        if self.split_conversations:
            text += f"; {self.split_conversations} long conversations split between exchanges"
        if self.cut_exchanges:
            text += f"; {self.cut_exchanges} exchanges longer than --max-length trained on their first part"
        text += "".join(f"; dropped {count} {why}" for why, count in self.dropped.items())
        return text + "".join(f"; {count} with {what}" for what, count in self.fitted.items())


def trained_tokens(examples: Sequence[dict]) -> int:
    """How many tokens of these examples carry a label (are trained)."""
    return sum(label != IGNORE_INDEX for example in examples for label in example["labels"])


def tokenize_examples(conversations: Sequence[List[dict]], tokenizer, max_length: int,
                      system_prompt: Optional[str] = None, train_on_prompt: bool = False,
                      report: Optional[ExampleReport] = None) -> List[Dict[str, list]]:
    """Token ids and labels per conversation; ones over `max_length` tokens are split between exchanges."""
    report = report if report is not None else ExampleReport()
    examples = []
    for messages in conversations:
        report.conversations += 1
        messages = with_system_prompt(messages, system_prompt)
        report.fitted.update(fit_to_template(messages, tokenizer)[1])
        ids, labels = tokenize_conversation(messages, tokenizer, train_on_prompt)
        if len(ids) <= max_length:
            pieces = [(ids, labels)]
        else:
            report.split_conversations += 1
            pieces = _split_long(messages, tokenizer, max_length, train_on_prompt, report)
        for ids, labels in pieces:
            if all(label == IGNORE_INDEX for label in labels):
                report.dropped["with no trained token"] += 1
                continue
            examples.append({"input_ids": ids, "labels": labels, "length": len(ids)})
            report.tokens += len(ids)
            report.trained_tokens += trained_tokens(examples[-1:])
    report.examples += len(examples)
    return examples


MIN_CUT_TRAINED = 32  # answer tokens a cut exchange must keep to be worth training


def first_part(ids: List[int], labels: List[int], max_length: int):
    """An exchange too long for `max_length`, cut there: the answer's first part is trained and, the cut
    answer's end not being in it, no end of turn is learned at the cut. None when too little answer is left."""
    ids, labels = ids[:max_length], labels[:max_length]
    if sum(label != IGNORE_INDEX for label in labels) < MIN_CUT_TRAINED:
        return None
    return ids, labels


def _split_long(messages, tokenizer, max_length: int, train_on_prompt: bool, report: ExampleReport):
    """Greedy runs of whole exchanges that fit, each with the system message; an exchange too long on its
    own is trained on its first part (cut at a token boundary), or left out when its prompt fills it."""
    system, exchanges = split_exchanges(messages)
    head = [system] if system else []
    pieces, run, best = [], [], None
    for exchange in exchanges:
        ids, labels = tokenize_conversation(head + run + exchange, tokenizer, train_on_prompt)
        if len(ids) <= max_length:
            run, best = run + exchange, (ids, labels)
            continue
        if run:
            pieces.append(best)
        ids, labels = tokenize_conversation(head + exchange, tokenizer, train_on_prompt)
        run = []
        if len(ids) <= max_length:
            run, best = list(exchange), (ids, labels)
        elif (cut := first_part(ids, labels, max_length)) is not None:
            pieces.append(cut)
            report.cut_exchanges += 1
        else:
            report.dropped["exchanges whose prompt fills --max-length"] += 1
    if run:
        pieces.append(best)
    return pieces


def text_blocks(ids: Sequence[int], block_size: int, overlap: int) -> List[dict]:
    """Blocks of `block_size` tokens, each starting `block_size - overlap` after the last.

    The first `overlap` tokens of every block but the first repeat the end of the previous block:
    they are context, labelled IGNORE_INDEX, so every token is trained exactly once.
    """
    if not 0 <= overlap < block_size:
        raise ChatkitError(f"--overlap must be at least 0 and below the block size ({block_size} tokens)")
    stride = block_size - overlap
    blocks = []
    for start in range(0, max(len(ids) - overlap, 1), stride):
        block = list(ids[start:start + block_size])
        if len(block) < 2:
            break
        labels = list(block)
        if start > 0:
            labels[:overlap] = [IGNORE_INDEX] * min(overlap, len(labels))
        blocks.append({"input_ids": block, "labels": labels, "length": len(block)})
    return blocks


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
        taught = "teacher_index" in batch[0]
        columns: Dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": [],
                                    "teacher_index": []}
        for example in batch:
            pad = width - len(example["input_ids"])
            columns["input_ids"].append(list(example["input_ids"]) + [self.pad_token_id] * pad)
            columns["labels"].append(list(example["labels"]) + [IGNORE_INDEX] * pad)
            columns["attention_mask"].append([1] * len(example["input_ids"]) + [0] * pad)
            if self.packed:
                columns["position_ids"].append(list(example["position_ids"]) + list(range(pad)))
            if taught:
                columns["teacher_index"].append(list(example["teacher_index"]) + [-1] * pad)
        keep = ["input_ids", "labels", "position_ids" if self.packed else "attention_mask"]
        keep += ["teacher_index"] if taught else []
        # No key/value cache in training: it is never read, and with one transformers would not
        # detect packed sequences (it builds the block-diagonal mask only for cache-free forwards).
        return {name: torch.tensor(columns[name]) for name in keep} | {"use_cache": False}


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
    return [_concatenate(group, taught) for group in bins]


def _concatenate(group: List[dict], taught: bool) -> dict:
    ids, labels, positions, teacher = [], [], [], []
    for example in group:
        ids += example["input_ids"]
        # The first token of a conversation is never predicted from the one before it.
        labels += [IGNORE_INDEX] + list(example["labels"][1:])
        positions += list(range(len(example["input_ids"])))
        teacher += example.get("teacher_index") or [-1] * len(example["input_ids"])
    packed = {"input_ids": ids, "labels": labels, "position_ids": positions, "length": len(ids)}
    if taught:
        packed["teacher_index"] = teacher
    return packed


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int, seed: int) -> List[List[int]]:
    """Batches of example indices: at most `max_rows` examples and `max_tokens` padded tokens each.

    Examples of similar length go together (little padding): the order is shuffled with `seed`, cut
    into windows of 50 batches' worth, and each window sorted by length before it is cut into batches;
    the batches are then shuffled. An example longer than `max_tokens` is a batch of its own.
    """
    import random

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = max(1, max_rows * 50)
    batches: List[List[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batch: List[int] = []
        for index in chunk:  # longest first: a batch's first example is its widest
            if batch and (len(batch) == max_rows or lengths[batch[0]] * (len(batch) + 1) > max_tokens):
                batches.append(batch)
                batch = []
            batch.append(index)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


class TokenBudgetSampler:
    """A batch sampler over token_batches: the same batches every pass, in an order shuffled per pass.

    Keeping the batches fixed keeps the number of steps exact (the learning-rate schedule ends where
    the run ends); the order depends on the seed and the pass, so a resumed run sees what it would have.
    """

    def __init__(self, lengths: Sequence[int], max_rows: int, max_tokens: int, seed: int):
        self.batches = token_batches(lengths, max_rows, max_tokens, seed)
        self.seed = seed
        self.passes = 0

    def set_epoch(self, epoch: int) -> None:
        self.passes = epoch

    def __iter__(self):
        import random

        order = list(self.batches)
        random.Random(self.seed * 1000 + self.passes).shuffle(order)
        self.passes += 1
        return iter(order)

    def __len__(self) -> int:
        return len(self.batches)
