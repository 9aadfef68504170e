"""Every option of every script, declared once: name, type, default, help and check.

Each script's options are one dataclass; groups that several scripts take (the model and hardware,
generation, LoRA) are dataclasses they inherit, so a flag is spelled and explained in one place.
`chatkit.cli` builds the argparse parser and the `--config` reader from these declarations, and
`problems()` checks a filled-in object, naming each flag, whether it came from a command line or code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional

from .device import DTYPES
from .optionspec import option, problems  # noqa: F401 - problems: options.problems too

STARTER_MODEL = "smollm2-135m"
GPT2_MODEL = "gpt2-small (124M)"


# transformers' schedules (SchedulerType), named here so --help stays free of heavy imports.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


# ---------------------------------------------------------------------------------------------
# Shared groups


@dataclass
class Common:
    __group__ = None
    verbose: bool = option(False, "show library warnings and notices (CHATKIT_DEBUG=1 also shows tracebacks)")


@dataclass
class Hardware:
    __group__ = "hardware"
    device: Optional[str] = option(None, "auto (default), cpu, cuda, cuda:N or mps")
    dtype: Optional[str] = option(None, "auto (default: bf16/fp16 on GPU, float32 on CPU), float32, bfloat16, float16",
                                  choices=DTYPES)
    trust_remote_code: bool = option(False, "allow model code from the Hub repository")


@dataclass
class GenerationSettings:
    """How answers are sampled; the chat, the web page and the GPT-2 chatbot share these defaults."""

    __group__ = "generation"
    temperature: float = option(0.7, "0 means greedy (default: %(default)s)", check="non-negative")
    top_p: float = option(0.9, "(default: %(default)s)", flags=("--top_p",), check="probability")
    # 256 tokens: a few paragraphs, the length of most chat answers; the context window caps it too.
    max_new_tokens: int = option(256, "longest answer in tokens (default: %(default)s)",
                                 flags=("--max_new_tokens", "--max-tokens"), check="positive")
    # 1.1: small models loop on their own phrases without a little penalty.
    repetition_penalty: float = option(1.1, "(default: %(default)s)", check="positive")
    seed: Optional[int] = option(None, "make sampling repeatable", check="seed")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature and self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def generation_settings(options) -> GenerationSettings:
    """The generation group of a script's options, as its own object."""
    names = [f.name for f in dataclasses.fields(GenerationSettings)]
    return GenerationSettings(**{name: getattr(options, name) for name in names})


@dataclass
class Lora:
    __group__ = "LoRA"
    lora: bool = option(True, "train a LoRA adapter (default) or, with --no-lora, every weight")
    # Rank 16 on all linear layers: the measured best of speed and recall on the starter model.
    lora_r: int = option(16, "adapter rank (default: %(default)s)", check="positive")
    lora_alpha: int = option(32, "(default: %(default)s)", check="positive")
    lora_dropout: float = option(0.0, "(default: %(default)s; 0.05 costs 20%% of CPU throughput)", check="fraction")
    lora_target_modules: str = option("all-linear", "comma-separated module names, or all-linear "
                                                    "(default: %(default)s)")
    load_in_4bit: bool = option(False, "QLoRA: the base model in 4-bit NF4 (bitsandbytes; a CUDA GPU or the CPU)")
    load_in_8bit: bool = option(False, "the base model in 8-bit (bitsandbytes; a CUDA GPU or the CPU)")
    merge: bool = option(False, "also write a standalone merged model to OUTPUT/merged")


# ---------------------------------------------------------------------------------------------
# train_chatgpt_model.py


def _parsed_by(parser: str):
    """A check that runs plan.`parser` on a flag's text: the value and the problem, the flag being named by
    `problems()`. The parser is imported when a value is checked, so --help stays light."""
    def check(text: str) -> Optional[str]:
        from . import plan
        from .errors import ChatkitError

        try:
            getattr(plan, parser)(text)
        except ChatkitError as exc:
            return str(exc).split(" ", 1)[1]
        return None

    return check


@dataclass
class TrainOptions(Common, Hardware, Lora):
    """Fine-tuning a chat model on conversations."""

    __config__ = True  # the script takes --config FILE
    data: List[str] = option(help="training data: JSON or JSONL, or your ChatGPT export as mailed (zip, folder "
                                  "or conversations.json), converted first (several allowed)", nargs="+",
                             metavar="FILE", required=True, factory=list)
    redact: bool = option(False, "with an export as --data: replace e-mails, phone numbers, keys and tokens, IPs "
                                 "and card numbers with [EMAIL] and the like before training")
    model: Optional[str] = option(None, f"model to fine-tune: a name, Hub id, local directory or .gguf "
                                        f"(default: {STARTER_MODEL})")
    output: str = option("./chat-model", "where the trained model goes (default: %(default)s)")
    overwrite: bool = option(False, "replace a model already in --output")
    resume: Optional[str] = option(None, "continue an interrupted run from its latest checkpoint "
                                         "(DIR defaults to --output)", nargs="?", const="", metavar="DIR")
    epochs: Optional[float] = option(None, "passes over the data (default: enough for about 140 updates, 3 to 20)",
                                     check="positive")
    learning_rate: Optional[float] = option(None, "default 1e-3 with LoRA, 2e-5 for full fine-tuning",
                                            check="positive")
    batch_size: Optional[int] = option(None, "conversations per step (default: up to 8, at least 16 steps "
                                             "per epoch)", check="positive")
    gradient_accumulation_steps: int = option(1, "steps whose gradients add up before an update "
                                                 "(default: %(default)s)", check="positive")
    # 1024 tokens: most chat exchanges fit; longer conversations are split between exchanges.
    max_length: int = option(1024, "tokens per example; longer conversations are split between exchanges "
                                   "(default: %(default)s)", check=lambda v: None if v >= 16 else "must be at least 16 tokens")
    warmup_ratio: float = option(0.05, "share of steps warming up (default: %(default)s)", check="fraction")
    lr_scheduler: str = option("cosine", "learning-rate schedule (default: %(default)s)", choices=SCHEDULERS)
    weight_decay: float = option(0.0, "(default: %(default)s)", check="non-negative")
    val_split: Optional[float] = option(None, "share held out for validation (default 0.1 with 10+ "
                                              "conversations, else 0)", check="fraction")
    eval_steps: Optional[int] = option(None, "evaluate every N steps (default: once per epoch)", check="positive")
    save_steps: Optional[int] = option(None, "save a checkpoint every N steps (default: once per epoch)",
                                       check="positive")
    logging_steps: int = option(5, "log every N steps (default: %(default)s)", check="positive")
    early_stopping_patience: Optional[int] = option(None, "stop after N evaluations without improvement",
                                                    metavar="N", check="positive")
    seed: int = option(42, "(default: %(default)s)", check="seed")
    system_prompt: Optional[str] = option(None, "system message added to conversations without one (and used by "
                                                "the chat)")
    rehearsal: Optional[int] = option(None, "mix in the model's own answers to N general prompts, so it keeps "
                                            "answering general questions as before (default: one per 8 "
                                            "conversations, at most 32; 0 turns it off)", metavar="N",
                                      check="off-or-more")
    # Off by default: it recalled facts asked in new words more often but kept fewer general answers.
    neftune_alpha: float = option(0.0, "noise on the input embeddings while training (NEFTune; 5 is usual): facts "
                                       "asked in new words are recalled more often, general answers kept less "
                                       "often (default: %(default)s, off)", metavar="A",
                                  check="off-or-more")
    train_on_prompt: bool = option(False, "train on every token, not only the assistant's")
    packing: bool = option(False, "pack several conversations per sequence (no cross-attention)")
    time_budget: Optional[str] = option(None, "finish the whole run, saved model included, within DURATION (90s, "
                                              "30m, 2h): trains on what fits, with a schedule for that many steps",
                                        metavar="DURATION", check=_parsed_by("parse_duration"))
    # What the base model does not know of the user's world first: on the shared export with made-up facts
    # it is what made a budget teach them (docs/PERFORMANCE.md, "Choosing what a budget trains").
    budget_selection: str = option("surprise", "what a --time-budget shorter than the whole schedule trains: "
                                               "first the exchanges holding words the base model does not know "
                                               "that recur across your conversations, several times each (read "
                                               "once, forward only, and kept for later runs), then whole "
                                               "conversations (surprise, the default); or only a random sample of "
                                               "whole conversations (random)",
                                   choices=("surprise", "random"))
    dry_run: bool = option(False, "print the plan (size, steps, time, memory) and exit without training")
    preferences: Optional[str] = option(None, "after the supervised training, learn from preference pairs "
                                              "(convert_chatgpt_export.py --preferences): DPO on the LoRA adapter",
                                        metavar="FILE")
    # DPO's defaults, for tens to hundreds of pairs (docs/PERFORMANCE.md, "Learning from preferences"): beta
    # as TRL and the paper; with the supervised loss on the chosen answers added (RPO), a LoRA learning
    # rate and passes that move the answers, not only the margins, without drifting to long answers.
    dpo_beta: float = option(0.1, "--preferences: how far from the supervised model the answers may move "
                                  "(default: %(default)s; 0.01-1 is usual)",
                             check=lambda v: None if 0 < v <= 10 else "must be above 0 and at most 10 (0.1 is usual)")
    dpo_epochs: int = option(3, "--preferences: passes over the pairs (default: %(default)s)", check="positive")
    dpo_learning_rate: float = option(2e-4, "--preferences: learning rate (default: %(default)s)", check="positive")
    dpo_sft_weight: float = option(1.0, "--preferences: add this times the supervised loss on the chosen answers "
                                        "to DPO's, so they stay likely and answers do not drift longer (RPO; "
                                        "0: DPO alone; default: %(default)s)", check="off-or-more")
    report: str = option("full", "full (default): OUTPUT/report.md compares the base and trained models' answers "
                                 "to your prompts and general questions; none: only the loss figures and plot",
                         choices=("full", "none"))
    max_batch_tokens: Optional[int] = option(None, "padded tokens per step at most, so memory stays bounded "
                                                   "(default: 1024 on a CPU, 16384 on a GPU)", metavar="N",
                                             check="positive")
    max_memory: Optional[str] = option(None, "memory the run may use, such as 6GB or 6GiB (default: 60%% of the "
                                             "memory available when it starts, at most half the machine's; on a "
                                             "GPU 90%% of its free memory); above it, gradient checkpointing, then "
                                             "steps of fewer tokens", metavar="SIZE", check=_parsed_by("parse_size"))
    gradient_checkpointing: Optional[bool] = option(None, "recompute activations in the backward pass: less memory, "
                                                          "some more compute (default: on when a step would need "
                                                          "more than --max-memory)")
    push_to_hub: bool = option(False, "upload the result (private) after training")
    hub_name: Optional[str] = option(None, "repository to push to", metavar="USER/NAME")

    @property
    def effective_learning_rate(self) -> float:
        # LoRA's small adapters need a rate far above full fine-tuning's (docs/PERFORMANCE.md).
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-3 if self.lora else 2e-5

    @property
    def method(self) -> str:
        if not self.lora:
            return "full fine-tuning"
        return "QLoRA 4-bit" if self.load_in_4bit else "QLoRA 8-bit" if self.load_in_8bit else "LoRA"

    def cross_problems(self) -> List[str]:
        found = []
        if self.load_in_4bit and self.load_in_8bit:
            found.append("--load-in-4bit and --load-in-8bit: choose one")
        if (self.load_in_4bit or self.load_in_8bit) and not self.lora:
            found.append("--load-in-4bit/--load-in-8bit train a LoRA adapter: drop --no-lora")
        if self.push_to_hub and not self.hub_name:
            found.append("--push-to-hub needs --hub-name USER/NAME")
        if self.preferences and not self.lora:
            found.append("--preferences trains the LoRA adapter: drop --no-lora")
        return found


# ---------------------------------------------------------------------------------------------
# demo_chatbot.py


@dataclass
class ChatOptions(Common, Hardware, GenerationSettings):
    """Talking to a model: console, one query, or a web page."""

    model: Optional[str] = option(None, f"model to load (default: {STARTER_MODEL}); also --model MODEL",
                                  positional=True, nargs="?", metavar="MODEL", flags=("--model",))
    query: Optional[str] = option(None, "answer TEXT on stdout and exit (- reads stdin)", flags=("-q",),
                                  metavar="TEXT")
    system_prompt: Optional[str] = option(None, "system message (default: the one the model was trained with)")
    no_cache_reuse: bool = option(False, "recompute the whole history every turn")
    web: bool = option(False, "serve a chat page instead of the console chat")
    serve: bool = option(False, "serve an OpenAI-compatible API (/v1/chat/completions, /v1/models) instead")
    compare: bool = option(False, "show the base model's answer beside the trained one (a trained LoRA adapter)")
    host: str = option("127.0.0.1", "address to serve on (default: %(default)s, this machine only)")
    port: Optional[int] = option(None, "(default: 7860 for --web, 8000 for --serve)",
                                 check=lambda v: None if 0 < v < 65536 else "must be 1-65535")
    share: bool = option(False, "also open a public gradio.live link (only when asked)")
    queue: int = option(8, "--serve: requests that may wait while one is answered; more get HTTP 429 "
                           "(default: %(default)s)", metavar="N", check="non-negative")
    api_key: Optional[str] = option(None, "--serve: answer only requests with `Authorization: Bearer KEY` "
                                          "(default: $CHATKIT_API_KEY, else none; set one when --host is not "
                                          "127.0.0.1)", metavar="KEY")

    @property
    def served_port(self) -> int:
        return self.port if self.port is not None else 8000 if self.serve else 7860

    def cross_problems(self) -> List[str]:
        found = []
        modes = [flag for flag, on in (("--web", self.web), ("--serve", self.serve),
                                       ("--query", self.query is not None)) if on]
        if len(modes) > 1:
            found.append(f"{' and '.join(modes)}: choose one")
        if (self.host != "127.0.0.1" or self.port is not None) and not (self.web or self.serve):
            found.append("--host and --port go with --web or --serve")
        if self.share and not self.web:
            found.append("--share goes with --web")
        if self.queue != 8 and not self.serve:
            found.append("--queue goes with --serve")
        if self.query is not None and not self.query.strip():
            found.append("--query is empty: give the question (or - to read it from standard input)")
        if self.api_key is not None and not self.serve:
            found.append("--api-key goes with --serve")
        if self.api_key is not None and not self.api_key.strip():
            found.append("--api-key must not be empty")
        if self.compare and self.serve:
            found.append("--compare and --serve: choose one")
        return found


# ---------------------------------------------------------------------------------------------
# convert_chatgpt_export.py


def _date(value: str) -> Optional[str]:
    from datetime import datetime

    try:
        datetime.fromisoformat(value)
    except ValueError:
        return f"{value!r} is not YYYY-MM-DD or an ISO date-time"
    return None


@dataclass
class ConvertOptions(Common):
    """Turning ChatGPT exports into training records."""

    paths: List[str] = option(help="one or more exports, then the output file", positional=True, nargs="+",
                              metavar="INPUT ... OUTPUT", factory=list,
                              check=lambda v: None if len(v) >= 2 else "needs at least one INPUT and then the OUTPUT file")
    overwrite: bool = option(False, "replace OUTPUT when it exists already")
    jsonl: bool = option(False, "write JSON Lines whatever OUTPUT is called")
    metadata: bool = option(False, "add id, title, create_time and model to each record")
    preview: int = option(0, "print K converted conversations to stderr (default 3)", nargs="?", const=3,
                          metavar="K", check="non-negative")
    quiet: bool = option(False, "no progress lines")
    all_branches: bool = option(False, "every root-to-leaf path (edits, regenerations) becomes its own record")
    include_tools: bool = option(False, "keep tool calls and results as fenced blocks inside the assistant turn")
    image_placeholder: Optional[str] = option(None, "put TEXT where an image or file was", metavar="TEXT")
    system_prompt: Optional[str] = option(None, "prepend this system message to every record", metavar="TEXT")
    custom_instructions: bool = option(True, "use the conversation's custom instructions (\"about you\", \"how to "
                                             "respond\") as its system message, where it has them (default: on)")
    redact: bool = option(False, "replace e-mails, phone numbers, keys and tokens, IPs and card numbers with "
                                 "[EMAIL] etc.")
    min_exchanges: int = option(1, "keep conversations with at least N user->assistant exchanges (default 1)",
                                metavar="N", check="non-negative")
    max_chars: Optional[int] = option(None, "drop conversations over N characters", metavar="N",
                                      deprecated=("--max-length",), check="non-negative")
    max_conversation_tokens: Optional[int] = option(None, "drop conversations over N tokens (needs --tokenizer)",
                                                    metavar="N", deprecated=("--max-tokens",), check="non-negative")
    tokenizer: Optional[str] = option(None, "model whose tokenizer counts --max-conversation-tokens", metavar="MODEL")
    truncate: bool = option(False, "with --max-chars/--max-conversation-tokens: cut at an exchange boundary "
                                   "instead of dropping")
    since: Optional[str] = option(None, "only conversations created on or after DATE (YYYY-MM-DD)", metavar="DATE",
                                  check=_date)
    until: Optional[str] = option(None, "only conversations created on or before DATE", metavar="DATE", check=_date)
    title: Optional[str] = option(None, "only conversations whose title matches (case-insensitive)", metavar="REGEX")
    chatgpt_model: Optional[str] = option(None, "only conversations with this ChatGPT model (e.g. gpt-4o)",
                                          metavar="SLUG", deprecated=("--model",))
    exclude_archived: bool = option(False, "leave out archived conversations")
    preferences: Optional[str] = option(None, "also write preference pairs (prompt, chosen, rejected) from "
                                              "regenerated answers and thumbs to OUT.jsonl", metavar="OUT.jsonl")

    @property
    def inputs(self) -> List[str]:
        return list(self.paths[:-1])

    @property
    def output(self) -> str:
        return self.paths[-1]

    @property
    def writes_jsonl(self) -> bool:
        return self.jsonl or self.output.lower().endswith(".jsonl")

    def cross_problems(self) -> List[str]:
        found = []
        if self.truncate and not (self.max_chars or self.max_conversation_tokens):
            found.append("--truncate needs --max-chars or --max-conversation-tokens")
        if self.preferences and self.output and os.path.abspath(self.preferences) == os.path.abspath(self.output):
            found.append("--preferences names OUTPUT itself; give the pairs a file of their own")
        if self.preferences and os.path.exists(self.preferences) and not self.overwrite:
            found.append(f"--preferences {self.preferences} exists already; pass --overwrite to replace it")
        return found


# ---------------------------------------------------------------------------------------------
# train_chatbot.py and gpt_generate.py


def _existing_file(path: str) -> Optional[str]:
    import os

    return None if os.path.isfile(path) else f"{path}: no such file"


@dataclass
class ChatbotTrainOptions(Common, Hardware):
    """Training every weight of a GPT-2 (or any causal) model on text and example dialogues."""

    model: str = option(GPT2_MODEL, "model to train (default: %(default)s)")
    text_file: Optional[str] = option(None, "plain text to learn", flags=("--text_file",), metavar="FILE",
                                      check=_existing_file)
    conversation_file: Optional[str] = option(None, "example dialogues: JSON [{\"user\": ..., \"bot\": ...}] or the "
                                                    "messages format", flags=("--conversation_file",), metavar="FILE",
                                              check=_existing_file)
    save_path: str = option("trained_model.pt", "where to save: X.pt for one file, or a directory "
                                                "(default: %(default)s)", flags=("--save_path",))
    overwrite: bool = option(False, "replace --save_path when it exists already")
    epochs: float = option(1.0, "(default: %(default)s)", check="positive")
    batch_size: int = option(4, "(default: %(default)s)", flags=("--batch_size",), check="positive")
    # 5e-5: the usual rate for fine-tuning every weight of GPT-2.
    learning_rate: float = option(5e-5, "(default: %(default)s)", flags=("--learning_rate",), check="positive")
    max_length: Optional[int] = option(None, "tokens per block or example (default: the model's context, at "
                                             "most 1024)", flags=("--max_length",), check="positive")
    overlap: int = option(0, "tokens repeated between text blocks as context (default: 0)", check="non-negative")
    val_split: Optional[float] = option(None, "share held out to measure loss (default 0.1 with 10+ blocks or "
                                              "dialogues)", flags=("--val_split",), check="fraction")
    seed: int = option(42, "(default: %(default)s)", check="seed")
    interactive: bool = option(False, "chat with the model in the console after training")

    def cross_problems(self) -> List[str]:
        if not self.text_file and not self.conversation_file:
            return ["give --text_file, --conversation_file, or both"]
        return []


@dataclass
class GenerateOptions(Common, Hardware, GenerationSettings):
    """Continuing a prompt with a GPT-2 (or any causal) model, or chatting with it."""

    model: str = option(GPT2_MODEL, "a GPT-2 size, a .pt from train_chatbot.py, or any model the toolkit accepts "
                                     "(default: %(default)s)")
    base_model: Optional[str] = option(None, "for a .pt holding only weights: the model they belong to")
    prompt: Optional[str] = option(None, "text to continue")
    chat: bool = option(False, "chat in the console instead")

    def cross_problems(self) -> List[str]:
        return [] if self.prompt or self.chat else ["give --prompt TEXT, or --chat"]


# ---------------------------------------------------------------------------------------------
# export_model.py

GGUF_TYPES = ("f16", "q8_0", "f32")


def _gguf_name(value: Optional[str]) -> Optional[str]:
    return None if value is None or value.lower().endswith(".gguf") else "should name a .gguf file"


@dataclass
class ExportOptions(Common):
    """Writing a model as one GGUF file for llama.cpp, Ollama and LM Studio."""

    model: Optional[str] = option(None, f"model to export: a trained output folder (adapter or merged), a model "
                                        f"folder, a .gguf, a Hub id or a name (default: {STARTER_MODEL})",
                                  positional=True, nargs="?", metavar="MODEL", flags=("--model",))
    gguf: Optional[str] = option(None, "the GGUF file to write (the whole model, a LoRA adapter merged in)",
                                 metavar="OUT.gguf", check=_gguf_name)
    lora_gguf: Optional[str] = option(None, "also, or instead, write a LoRA adapter alone as a llama.cpp LoRA file, "
                                            "for `--lora` beside its base model's GGUF", metavar="ADAPTER.gguf",
                                      check=_gguf_name)
    type: str = option("f16", "weight type: f16 (default; as trained), q8_0 (half the size, nearly the same "
                              "answers) or f32", choices=GGUF_TYPES)
    ollama: bool = option(False, "also write an Ollama Modelfile beside OUT.gguf and print the `ollama create` "
                                 "command")
    overwrite: bool = option(False, "replace OUT.gguf (and the Modelfile) when they exist already")

    def cross_problems(self) -> List[str]:
        if not self.gguf and not self.lora_gguf:
            return ["name the file to write: --gguf OUT.gguf (the whole model) or --lora-gguf ADAPTER.gguf"]
        if self.ollama and not self.gguf:
            return ["--ollama needs --gguf: Ollama builds a model from a whole-model GGUF file"]
        return []
