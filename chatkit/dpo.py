"""Learning what the user preferred: DPO on the LoRA adapter, against the model as it was before DPO.

Direct Preference Optimization (Rafailov et al., 2023) raises the log-probability of the chosen answer
over the rejected one, measured against a reference model:

    loss = -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))))
           + sft_weight * (the chosen answers' mean negative log-likelihood per token)

The second term (RPO, Pang et al., 2024; TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, alpha])
keeps the chosen answers likely in absolute terms: DPO alone only widens the gap, and where the chosen
answer is the rejected one plus more words it learns "do not stop here" and drifts towards long answers.

The reference is the model as supervised training left it: TRL's DPOTrainer does the same for an adapter
that was already trained (it keeps a frozen copy of it); for a fresh adapter that is the adapter switched
off. Its log-probabilities are computed once, before the first DPO step, so no second model or adapter is
held in memory. The loss is written here once and checked against TRL's DPOTrainer on the same batch, loss
and gradients (tests/test_dpo.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .datasets import split_train_val
from .errors import ChatkitError, Terminated
from .formatting import IGNORE_INDEX, tokenize_conversation, with_system_prompt
from .output import Progress, say


@dataclass
class PreferenceReport:
    pairs: int = 0
    dropped: Dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"{self.pairs} preference pairs"
        return text + "".join(f"; left out {count} {why}" for why, count in self.dropped.items())


def _messages(value, where: str, name: str) -> List[dict]:
    if isinstance(value, str):
        value = [{"role": "assistant" if name != "prompt" else "user", "content": value}]
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                             "assistant")
            for m in value):
        raise ChatkitError(f"{where}: '{name}' should be a list of {{role, content}} messages (or a string)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_pairs(path: str) -> List[dict]:
    """Preference pairs from JSON Lines (TRL's conversational format, as convert_chatgpt_export.py
    --preferences writes): each record's problem is one error naming the file and the line."""
    file = Path(path)
    if file.is_dir():
        raise ChatkitError(f"--preferences {path} is a folder; name the pairs file in it (convert_chatgpt_export.py "
                           "--preferences writes one)")
    if not file.is_file():
        raise ChatkitError(f"--preferences {path}: no such file")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChatkitError(f"--preferences {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON Lines, "
                           "one pair a line") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ChatkitError(f"{where}: not valid JSON ({exc.msg}); expected one pair a line") from None
        if not isinstance(record, dict):
            raise ChatkitError(f"{where}: expected an object with prompt, chosen and rejected")
        missing = [name for name in ("prompt", "chosen", "rejected") if name not in record]
        if missing:
            raise ChatkitError(f"{where}: missing {', '.join(missing)}; each pair needs prompt, chosen and rejected")
        prompt = _messages(record["prompt"], where, "prompt")
        chosen, rejected = (_messages(record[name], where, name) for name in ("chosen", "rejected"))
        if prompt[-1]["role"] != "user":
            raise ChatkitError(f"{where}: the prompt should end with the user's message")
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if answer[-1]["role"] != "assistant":
                raise ChatkitError(f"{where}: '{name}' ends with a {answer[-1]['role']} message; it should be the "
                                   "assistant's answer to the prompt")
            if not "".join(m["content"] for m in answer).strip():
                raise ChatkitError(f"{where}: '{name}' is empty; remove the pair or give the answer")
        if chosen == rejected:
            raise ChatkitError(f"{where}: 'chosen' and 'rejected' are the same answer; a pair needs two different ones")
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise ChatkitError(f"--preferences {path}: the file holds no pairs")
    return pairs


def pair_examples(pairs: Sequence[dict], tokenizer, max_length: int, system_prompt: Optional[str],
                  report: PreferenceReport) -> List[dict]:
    """Token ids and labels of each pair's chosen and rejected conversation (labels on the answer only)."""
    examples = []
    for pair in pairs:
        sides = {}
        for name in ("chosen", "rejected"):
            messages = with_system_prompt(pair["prompt"] + pair[name], system_prompt)
            ids, labels = tokenize_conversation(messages, tokenizer)
            sides[name] = (ids, labels)
        if any(not any(label != IGNORE_INDEX for label in labels) for _, labels in sides.values()):
            raise ChatkitError("--preferences: the chat template leaves no answer token to learn in a pair (its "
                               f"prompt starts {pair['prompt'][-1]['content'][:40]!r}); check the model's chat "
                               "template with demo_chatbot.py, or pass another --model")
        if max(len(ids) for ids, _ in sides.values()) > max_length:
            report.dropped["pairs longer than --max-length"] = report.dropped.get("pairs longer than --max-length",
                                                                                 0) + 1
            continue
        examples.append(sides)
    report.pairs += len(examples)
    return examples


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
             sft_weight: float = 0.0, chosen_tokens=None):
    """The DPO loss of a batch (its mean) and each pair's reward margin (beta-scaled, as TRL logs it); with
    `sft_weight`, plus that times the chosen answers' negative log-likelihood per token (`chosen_tokens`:
    each chosen answer's number of labelled tokens; the mean is over the batch's tokens, as TRL takes it)."""
    import torch.nn.functional as F

    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    loss = -F.logsigmoid(margins).mean()
    if sft_weight:
        loss = loss + sft_weight * -policy_chosen.sum() / chosen_tokens.sum()
    return loss, margins


def answer_tokens(labels: List[int]) -> int:
    """The number of labelled tokens `sequence_logps` sums over."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def sequence_logps(model, ids: List[int], labels: List[int]):
    """The summed log-probability of the labelled tokens (the answer and its end of turn), through the
    fused output layer: no vocabulary-wide logits at the prompt's positions, none kept for the backward."""
    from .forward import labelled_loss_sum, padded_batch

    loss, _ = labelled_loss_sum(model, *padded_batch([{"input_ids": ids, "labels": labels}],
                                                     next(model.parameters()).device))
    return -loss


def pair_logps(model, examples: List[dict]) -> List[Tuple[float, float]]:
    """Each pair's (chosen, rejected) log-probability under the model as it is now."""
    import torch

    with torch.no_grad():
        return [tuple(float(sequence_logps(model, *example[name])) for name in ("chosen", "rejected"))
                for example in examples]


def preference_margins(logps: List[Tuple[float, float]]) -> List[float]:
    """Each pair's chosen-minus-rejected log-probability: above 0, the model prefers the chosen answer."""
    return [chosen - rejected for chosen, rejected in logps]


def train_dpo(model, examples: List[dict], epochs: int, beta: float, learning_rate: float, sft_weight: float,
              seed: int = 42, on_step=None, *, reference: List[Tuple[float, float]]) -> dict:
    """DPO on the trainable (LoRA) weights, one pair a step, against `reference`: the `pair_logps` of the
    examples under the model before DPO, computed once; `sft_weight` adds the chosen answer's supervised
    loss (`dpo_loss`). `on_step(step, total, loss)` after each step; when it returns True the rest is left
    out (a time budget). Returns the steps taken and the loss at the start and over the last epoch's worth
    of steps."""
    import torch

    from .forward import finite

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    rng = random.Random(seed)
    order = []
    for _ in range(epochs):
        order += rng.sample(range(len(examples)), len(examples))
    model.train()
    losses, stopped = [], None
    try:
        for index in order:
            chosen, rejected = (sequence_logps(model, *examples[index][name]) for name in ("chosen", "rejected"))
            ref_chosen, ref_rejected = (torch.tensor(v, device=chosen.device) for v in reference[index])
            tokens = torch.tensor(answer_tokens(examples[index]["chosen"][1]), device=chosen.device)
            loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, sft_weight, tokens)
            finite(loss, f"preference step {len(losses) + 1}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            if on_step and on_step(len(losses), len(order), float(loss)):
                stopped = "the time budget"
                break
    except Terminated:  # SIGTERM: the process is asked to end, not to finish; it exits 143, nothing half-written
        raise
    except KeyboardInterrupt:  # the supervised model is not saved yet: keep it, with the DPO steps taken
        stopped = "Ctrl-C"
    model.eval()
    last = losses[-len(examples):] or [math.log(2)]
    figures = {"dpo_steps": len(losses), "dpo_planned_steps": len(order),
               "dpo_loss_first": round(losses[0] if losses else math.log(2), 4),
               "dpo_loss_last": round(sum(last) / len(last), 4)}
    return figures | ({"dpo_stopped": stopped} if stopped else {})


DPO_HELD_OUT = 0.2  # of the pairs, to measure the margin on pairs the model did not learn from (5 or more pairs)


@dataclass
class Preferences:
    """The preference pairs, tokenized: those DPO trains on and those its margin is measured on."""

    train: List[dict]
    measured: List[dict]
    where: str  # "held-out", or "training" where there are too few pairs to hold some out
    report: PreferenceReport

    def pair_tokens(self) -> List[int]:
        """Per training pair: the tokens of its chosen and its rejected conversation."""
        return [len(pair["chosen"][0]) + len(pair["rejected"][0]) for pair in self.train]

    @property
    def count(self) -> int:
        return len(self.train) + (len(self.measured) if self.where == "held-out" else 0)


def tokenize_preferences(options, tokenizer, max_length: Optional[int] = None) -> Preferences:
    """--preferences tokenized (at `max_length`, or --max-length), split by prompt into trained and held-out pairs."""
    max_length = max_length or options.max_length
    report = PreferenceReport()
    examples = pair_examples(read_pairs(options.preferences), tokenizer, max_length, options.system_prompt, report)
    if not examples:
        raise ChatkitError(f"--preferences {options.preferences}: no pair fits --max-length {max_length}")
    # Held out by prompt: pairs that share a prompt (one chosen answer against each regeneration, or a pair
    # given twice) go to one side, so no held-out pair's chosen answer or prompt was trained on.
    groups = same_prompt_groups(examples)
    train_groups, held_groups = split_train_val(groups, DPO_HELD_OUT if len(groups) >= 5 else 0.0, options.seed)
    train, held = [e for g in train_groups for e in g], [e for g in held_groups for e in g]
    return Preferences(train, held, "held-out", report) if held else Preferences(train, train, "training", report)


def same_prompt_groups(examples: Sequence[dict]) -> List[List[dict]]:
    """The tokenized pairs grouped by their prompt (the tokens before the first labelled one), in order."""
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


def learn_preferences(options, model, preferences: Preferences, deadline=None,
                      planned_s: float = 0.0) -> dict:
    """DPO on the adapter after the supervised training, against the model that training left; the
    chosen-minus-rejected log-probability margin before and after, on held-out pairs where there are enough.
    Under a time budget the steps that would not end in time are left out; Ctrl-C leaves out the rest too
    (the model is saved with what DPO had done)."""
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

