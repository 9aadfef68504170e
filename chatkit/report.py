"""Did it work? The report every training run leaves: report.md, loss.png and the model card (README.md).

The report says what was trained, the loss before and after on the same examples, the base model's
and the trained model's answers to the user's own prompts beside the answer in the data, and a
"still knows" check: general questions answered by both, each flagged when the answer changed or
lost the fact it had. Base answers come from the same weights: with a LoRA adapter switched off
after training, or, for full fine-tuning, from the model before its first step.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .files import atomic_output, atomic_path
from .output import duration
from .rehearsal import own_answers

REPORT_FILE, PLOT_FILE, CARD_FILE = "report.md", "loss.png", "README.md"
PROMPTS = 6  # of the user's own, validation ones first
PROMPT_CHARS = 600  # longer prompts are passed over: a table cell cannot show them, and they cost the most
ANSWER_TOKENS = 32  # "greedy, short": a sentence or two, so the report stays under 10% of a short run
LOSS_EXAMPLES = 32  # examples the loss is measured on, at most,
LOSS_TOKENS = 4096  # and tokens: enough for a steady mean, about 10 s a pass for the starter model on 2 CPU cores
PLOT_SIZE = (8, 4.5)  # inches at PLOT_DPI: 800 x 450 pixels
PLOT_DPI = 100

# General questions with the words a right answer holds; none is among the rehearsal prompts.
STILL_KNOWS: List[Tuple[str, Tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
]


@dataclass
class Side:
    """One model's half of the comparison: its loss on the measured examples and its answers."""

    loss: Optional[float] = None
    answers: List[str] = field(default_factory=list)


def chosen_prompts(val_conversations: Sequence[List[dict]], train_conversations: Sequence[List[dict]],
                   limit: int = PROMPTS) -> List[Tuple[str, str]]:
    """(first user message, the answer in the data) of up to `limit` conversations, validation ones first,
    passing over prompts of more than PROMPT_CHARS characters."""
    chosen, seen = [], set()
    for conversation in list(val_conversations) + list(train_conversations):
        turns = [m for m in conversation if m["role"] != "system"]
        if len(turns) < 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            continue
        prompt = turns[0]["content"].strip()
        if prompt and prompt not in seen and len(prompt) <= PROMPT_CHARS:
            seen.add(prompt)
            chosen.append((prompt, turns[1]["content"].strip()))
        if len(chosen) == limit:
            break
    return chosen


LOSS_BATCH = 8


def loss_examples(val: Sequence[dict], train: Sequence[dict]) -> Tuple[List[dict], str]:
    """The examples the loss before and after is measured on (validation ones where there are some, else
    training ones), up to LOSS_EXAMPLES and LOSS_TOKENS; and which split they are from."""
    pool, split = (val, "validation") if val else (train, "training")
    chosen, tokens = [], 0
    for example in pool[:LOSS_EXAMPLES]:
        if chosen and tokens + len(example["input_ids"]) > LOSS_TOKENS:
            break
        chosen.append(example)
        tokens += len(example["input_ids"])
    return chosen, split


def mean_loss(model, examples: Sequence[dict]) -> Optional[float]:
    """The mean loss per trained token over `examples`, in batches padded on the right.

    In a causal model no real token sees the padding on its right, and padded positions carry no
    label, so a batch gives each example's loss as it would be alone."""
    import torch

    from .forward import labelled_loss_sum, padded_batch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), LOSS_BATCH):
                loss, labelled = labelled_loss_sum(model, *padded_batch(examples[start:start + LOSS_BATCH], device))
                total += float(loss)
                count += int(labelled)
    finally:
        model.train(was_training)
    return round(total / count, 4) if count else None


def adapter_off(model):
    """The block runs the base model: a LoRA adapter switched off (nothing to switch for other models)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def generation_ready(model):
    """The key/value cache on for generating (training with gradient checkpointing turns it off)."""
    @contextlib.contextmanager
    def ready():
        config = getattr(model, "config", None)
        before = getattr(config, "use_cache", True)
        if config is not None:
            config.use_cache = True
        try:
            yield
        finally:
            if config is not None:
                config.use_cache = before
    return ready()


def measure(model, tokenizer, prompts: Sequence[str], examples: Sequence[dict], system_prompt: Optional[str]) -> Side:
    """The model's loss on `examples` and its greedy answers to `prompts` (none under --report none)."""
    side = Side(loss=mean_loss(model, examples))
    if prompts:
        with generation_ready(model):
            side.answers = mark_cut(tokenizer, own_answers(model, tokenizer, list(prompts), system_prompt,
                                                            ANSWER_TOKENS))
    return side


MIXED_BATCH = 32  # base and trained answers in one batch: decoding on a CPU costs about the same for 20 rows as 10


def measure_both(model, tokenizer, prompts: Sequence[str], examples: Sequence[dict],
                 system_prompt: Optional[str]) -> Tuple[Side, Side]:
    """A LoRA model's base side (adapter off) and trained side; the answers of both in shared batches."""
    with adapter_off(model):
        base = Side(loss=mean_loss(model, examples))
    trained = Side(loss=mean_loss(model, examples))
    if prompts:
        active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
        names = ["__base__"] * len(prompts) + [active] * len(prompts)
        with generation_ready(model):
            both = own_answers(model, tokenizer, list(prompts) * 2, system_prompt, ANSWER_TOKENS, adapters=names,
                               batch=MIXED_BATCH)
        both = mark_cut(tokenizer, both)
        base.answers, trained.answers = both[:len(prompts)], both[len(prompts):]
    return base, trained


def mark_cut(tokenizer, answers: List[str]) -> List[str]:
    """Answers that reached the token limit end with "…", so a cut is not read as the model's own end."""
    return [a + " …" if len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= ANSWER_TOKENS - 1 else a
            for a in answers]


def report_prompts(chosen: Sequence[Tuple[str, str]]) -> List[str]:
    return [prompt for prompt, _ in chosen] + [question for question, _ in STILL_KNOWS]


# ---------------------------------------------------------------------------------------------
# The "still knows" verdict


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def verdict(base: str, trained: str, keywords: Sequence[str]) -> str:
    """same, reworded (changed, the fact kept), LOST (the base answer had the fact, the trained one not),
    or changed."""
    if _words(base) == _words(trained):
        return "same"
    has = [any(re.search(rf"\b{re.escape(k)}\b", text.lower()) for k in keywords) for text in (base, trained)]
    if has[0] and not has[1]:
        return "LOST"
    return "reworded" if has[0] and has[1] else "changed"


# ---------------------------------------------------------------------------------------------
# The plot


def plot_loss(log_history: Sequence[dict], path: str | Path) -> None:
    """Training loss per logged step and validation loss per evaluation, with the learning rate."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    rates = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e and "step" in e]
    figure, axis = plt.subplots(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    try:
        if train:
            axis.plot(*zip(*train), color="tab:blue", marker="." if len(train) < 30 else None, label="training loss")
        if val:
            axis.plot(*zip(*val), color="tab:orange", marker="o", label="validation loss")
        axis.set_xlabel("step")
        axis.set_ylabel("loss (per trained token)")
        axis.grid(alpha=0.3)
        handles, labels = axis.get_legend_handles_labels()
        if rates:
            other = axis.twinx()
            other.plot(*zip(*rates), color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
            other.set_ylabel("learning rate")
            other.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            more_handles, more_labels = other.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        if handles:
            axis.legend(handles, labels, loc="upper right")
        else:
            axis.text(0.5, 0.5, "no loss was logged (a run shorter than --logging-steps)", ha="center",
                      transform=axis.transAxes)
        axis.set_title("Training run")
        figure.tight_layout()
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        plt.close(figure)


# ---------------------------------------------------------------------------------------------
# The texts


@dataclass
class RunFacts:
    """What was trained, where and how long: the report's first section and the model card's."""

    output: str
    data_files: List[str]
    conversations: int
    examples: int
    tokens: int
    trained_tokens: int
    base_model: str  # a name or Hub id, never a local path
    method: str
    seconds: float
    device: str
    epochs: float
    steps: int
    loss_on: str  # "validation" or "training"
    measured_examples: int
    budget: Optional[str] = None  # under --time-budget: what was planned, what was trained, and why it changed
    preferences: Optional[str] = None  # with --preferences: the DPO stage and its margin before and after
    system_prompts: List[Tuple[str, int]] = field(default_factory=list)  # each one trained, and in how many conversations
    record: Optional[dict] = None  # chatkit.json's "reproducibility": versions, the data's hashes, the seed


def _cell(text: str, limit: int = 300) -> str:
    """Text fit for one Markdown table cell."""
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _loss_line(facts: RunFacts, before: Side, after: Side) -> str:
    where = (f"the {facts.measured_examples} validation examples" if facts.loss_on == "validation" else
             f"{facts.measured_examples} training examples (there is no validation split)")
    if before.loss is None or after.loss is None:
        return f"Loss: not measured (no example of {where} has a trained token)."
    return (f"Loss on {where}: **{before.loss:.3f} → {after.loss:.3f}** (perplexity {math.exp(min(before.loss, 50)):.1f}"
            f" → {math.exp(min(after.loss, 50)):.1f}).")


SHOWN_SYSTEM_PROMPTS = 5


def system_prompts(conversations: Sequence[Sequence[dict]], default: Optional[str]) -> List[Tuple[str, int]]:
    """The system messages trained (custom instructions from an export, or --system-prompt where a conversation
    has none), each with the number of conversations it opens, most used first."""
    from collections import Counter

    from .formatting import with_system_prompt

    counts = Counter()
    for messages in conversations:
        messages = with_system_prompt(messages, default)  # as training adds --system-prompt
        if messages and messages[0]["role"] == "system":
            counts[messages[0]["content"]] += 1
    return counts.most_common()


def _system_lines(facts: RunFacts) -> List[str]:
    if not facts.system_prompts:
        return ["- System messages: none (the conversations open with the user)"]
    used = sum(count for _, count in facts.system_prompts)
    lines = [f"- System messages trained (an export's custom instructions, or --system-prompt): "
             f"{len(facts.system_prompts)} different, opening {used} of {facts.conversations} conversations"]
    lines += [f"  - {count}×: {_cell(text, 200)}" for text, count in facts.system_prompts[:SHOWN_SYSTEM_PROMPTS]]
    if len(facts.system_prompts) > SHOWN_SYSTEM_PROMPTS:
        lines.append(f"  - and {len(facts.system_prompts) - SHOWN_SYSTEM_PROMPTS} more")
    return lines


def report_text(facts: RunFacts, before: Side, after: Side, chosen: Sequence[Tuple[str, str]]) -> str:
    lines = [f"# Training report: {Path(facts.output).name}", "",
             "## What was trained", "",
             f"- Data: {', '.join(facts.data_files)}: {facts.conversations} conversations, {facts.examples} examples, "
             f"{facts.tokens:,} tokens ({facts.trained_tokens:,} trained)",
             f"- Base model: {facts.base_model}",
             f"- Method: {facts.method}; {facts.epochs:g} epochs, {facts.steps} steps",
             f"- Time: {duration(facts.seconds)} on {facts.device}"]
    lines += [f"- Time budget: {facts.budget}"] if facts.budget else []
    lines += [f"- Preferences: {facts.preferences}"] if facts.preferences else []
    lines += _system_lines(facts)
    lines += ["",
             "## Loss", "", _loss_line(facts, before, after), "", f"![Loss per step]({PLOT_FILE})", ""]
    if not after.answers:
        lines += ["Answers were not generated (`--report none`).", ""]
        return "\n".join(lines)
    count = len(chosen)
    lines += ["## Your prompts", "",
              "Greedy, short answers (at most %d tokens) of the base model and of the trained one, with the answer "
              "in your data." % ANSWER_TOKENS, ""]
    if chosen:
        lines += ["| Prompt | In the data | Base model | Trained model |", "|---|---|---|---|"]
    else:
        lines.append(f"(No conversation of the data opens with a prompt of at most {PROMPT_CHARS} characters.)")
    for (prompt, reference), base, trained in zip(chosen, before.answers, after.answers):
        lines.append(f"| {_cell(prompt, 200)} | {_cell(reference)} | {_cell(base)} | {_cell(trained)} |")
    lines += ["", "## Still knows", "",
              "General questions the data does not ask. **LOST**: the base model's answer had the fact and the "
              "trained model's has not; *changed*: a different answer.", "",
              "| Question | Base model | Trained model | |", "|---|---|---|---|"]
    flagged = 0
    for (question, keywords), base, trained in zip(STILL_KNOWS, before.answers[count:], after.answers[count:]):
        mark = verdict(base, trained, keywords)
        flagged += mark in ("LOST", "changed")
        shown = {"LOST": "**LOST**", "changed": "*changed*"}.get(mark, mark)
        lines.append(f"| {_cell(question)} | {_cell(base)} | {_cell(trained)} | {shown} |")
    lines += ["", (f"{flagged} of {len(STILL_KNOWS)} general answers changed: check them above; more rehearsal "
                   "(`--rehearsal N`) or fewer epochs keep more." if flagged else
                   f"All {len(STILL_KNOWS)} general answers kept their facts."), ""]
    return "\n".join(lines)


def summary_line(before: Side, after: Side, count: int) -> str:
    """One line for the terminal: the loss, and how many general answers changed."""
    text = ""
    if before.loss is not None and after.loss is not None:
        text = f"loss {before.loss:.3f} -> {after.loss:.3f}"
    if after.answers:
        marks = [verdict(b, t, k) for (_, k), b, t in zip(STILL_KNOWS, before.answers[count:], after.answers[count:])]
        lost = sum(m in ("LOST", "changed") for m in marks)
        text += (", " if text else "") + (f"{lost} of {len(marks)} general answers changed" if lost else
                                          f"all {len(marks)} general answers kept")
    return text


def card_text(facts: RunFacts, before: Side, after: Side, adapter: bool) -> str:
    """The model card: front matter the Hub reads, then what the model is and how to use it."""
    name = Path(facts.output).name
    front = ["---", f"base_model: {facts.base_model}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: text-generation", "tags:", "- chatkit", "- chat"] + (["- lora"] if adapter else []) + ["---"]
    lines = front + ["", f"# {name}", "",
                     f"A chat model fine-tuned from {facts.base_model} with chatkit ({facts.method}) on "
                     f"{facts.conversations} conversations ({facts.trained_tokens:,} trained tokens) in "
                     f"{duration(facts.seconds)} on {facts.device}"
                     + (f" (time budget: {facts.budget})" if facts.budget else "") + ".", "",
                     *([f"Then learned from the user's preferences: {facts.preferences}.", ""] if facts.preferences
                       else []),
                     _loss_line(facts, before, after), "",
                     f"The full report, with the base and trained answers side by side: [{REPORT_FILE}]({REPORT_FILE}).",
                     "", "## Chat with it", "", "```bash",
                     f"python demo_chatbot.py {name}                # in the terminal",
                     f"python demo_chatbot.py {name} --web          # in the browser",
                     f"python demo_chatbot.py {name} --compare      # beside the base model",
                     f"python demo_chatbot.py {name} --serve        # an OpenAI-compatible API", "```", "",
                     "## Use it elsewhere", "", "```bash",
                     f"python export_model.py {name} --gguf {name}.gguf --ollama   # llama.cpp, Ollama, LM Studio",
                     "```", ""]
    if facts.record:
        lines += reproduce_lines(facts.record)
    if adapter:
        lines += ["This folder holds a LoRA adapter: the scripts find the base model by themselves (`chatkit.json`). "
                  "`train_chatgpt_model.py --merge` also writes a standalone merged model.", ""]
    return "\n".join(lines)


def reproduce_lines(record: dict) -> List[str]:
    """The model card's "Reproduce" section: the seed, the library versions and each data file's SHA-256."""
    versions = ", ".join(f"{name} {version}" for name, version in record.get("versions", {}).items())
    lines = ["## Reproduce", "", f"Seed {record.get('seed')}; {versions}.", "", "| data | SHA-256 | bytes |",
             "| --- | --- | --- |"]
    lines += [f"| {_cell(Path(item['file']).name)} | `{item['sha256']}` | {item['bytes']:,} |"
              for item in record.get("data", [])]
    return lines + ["", "The same command with the same versions and data repeats the run on a CPU bit for bit "
                        "(docs/RELIABILITY.md, \"A run repeated\").", ""]


def write_texts(folder: str | Path, facts: RunFacts, before: Side, after: Side, chosen: Sequence[Tuple[str, str]],
                adapter: bool) -> Dict[str, Path]:
    folder = Path(folder)
    written = {}
    for file, text in ((REPORT_FILE, report_text(facts, before, after, chosen)),
                       (CARD_FILE, card_text(facts, before, after, adapter))):
        with atomic_output(folder / file) as handle:
            handle.write(text)
        written[file] = folder / file
    return written
