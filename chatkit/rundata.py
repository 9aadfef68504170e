"""The data of a run: read, split, tokenized per conversation, and the examples the Trainer gets (the
model's own rehearsal answers mixed in, packed where asked)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from .datasets import default_val_split, read_conversations, split_train_val
from .errors import ChatkitError
from .examples import ExampleReport, pack_examples, tokenize_examples, trained_tokens
from .files import read_json_object, write_json
from .output import say
from .plan import CHARS_PER_TOKEN
from .rehearsal import Rehearsal, attach_teacher, rehearsal_conversations
from .runfolder import CHECKPOINTS

if TYPE_CHECKING:
    from .dpo import Preferences
    from .options import TrainOptions
    from .runplan import RunPlan


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
    focus: List[dict] = dataclasses.field(default_factory=list)  # exchanges a budget trains first (selection.py)

    def keep(self, kept: Sequence[Tuple[int, int]], val_examples: Optional[int], focus: int = 0) -> "Data":
        """The conversations a plan kept, each (index, its first n examples), and its first `focus` focus
        exchanges; fewer validation examples under a time budget."""
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
                    self.preferences, self.focus[:focus])

    def user_prompts(self) -> List[str]:
        return [m["content"] for c in self.conversations for m in c if m["role"] == "user"]


def tokenize_data(run: "RunPlan", tokenizer, train_convs, val_convs) -> Data:
    options = run.options

    def tokenize(conversations, report=None):
        return tokenize_examples(conversations, tokenizer, run.max_length, options.system_prompt,
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


REHEARSAL_FILE = "rehearsal.json"  # beside the checkpoints: a resumed run reuses the same answers


REHEARSAL_TOKENS = 90  # a rehearsal example's length, for the plan (a prompt and up to 64 answer tokens)


def rehearse(run: "RunPlan", model, tokenizer, data: Data, resuming: bool) -> Rehearsal:
    """The model's own answers to general prompts: generated, or read back when resuming a run."""
    options = run.options
    saved = Path(options.output) / CHECKPOINTS / REHEARSAL_FILE
    if resuming and run.rehearsal and saved.is_file():
        conversations = read_json_object(saved, "delete it to generate the answers again")["conversations"]
        say(f"rehearsal: reusing the {len(conversations)} answer{'s' if len(conversations) != 1 else ''} saved with the checkpoints")
        return Rehearsal(conversations=conversations, asked=len(conversations))
    rehearsal = rehearsal_conversations(model, tokenizer, run.rehearsal, options.system_prompt,
                                        like=data.user_prompts())
    if run.rehearsal:
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
    focus: List[dict] = dataclasses.field(default_factory=list)  # the focus stage's examples (selection.py)
    focus_exchanges: int = 0

    def tokens(self) -> int:
        """The tokens one epoch trains on."""
        return sum(len(example["input_ids"]) for example in self.train)

    def describe(self, report: ExampleReport, packing: bool) -> str:
        text = f"training on {report.describe()}"
        if self.focus_exchanges:
            text += (f"; then {self.focus_exchanges} exchange{'s' if self.focus_exchanges != 1 else ''} holding "
                     f"recurring words, {len(self.focus)} examples with the rehearsal's")
        if self.rehearsal.conversations:
            count = len(self.rehearsal.conversations)
            text += f", with {count} rehearsal example{'s' if count != 1 else ''}"
        if packing:
            text += f", packed into {len(self.train)} sequences"
        return text + (f"; {len(self.val)} for validation" if self.val else "; no validation split")


def prepare_examples(run: "RunPlan", model, tokenizer, data: Data, rehearsal: Rehearsal) -> Prepared:
    """Training and validation examples, with the model's own rehearsal answers mixed in."""
    options = run.options
    train = [example for examples in data.train for example in examples]
    focus = [dict(example) for example in data.focus for _ in range(run.focus_copies)]
    val, teacher = data.val, None
    if rehearsal.conversations:
        rehearsed = tokenize_examples(rehearsal.conversations, tokenizer, run.max_length, options.system_prompt,
                                      options.train_on_prompt)
        teacher = attach_teacher(model, rehearsed)
        for example in train + focus:
            example["teacher_index"] = [-1] * len(example["input_ids"])
        train += rehearsed
        focus += rehearsed if focus else []
    if options.packing:
        train = pack_examples(train, run.max_length)
        val = pack_examples(val, run.max_length) if val else []
    return Prepared(train, val, rehearsal, teacher, focus, len(data.focus))


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
