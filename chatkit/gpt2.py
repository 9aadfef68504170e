"""The GPT-2 chatbot: training on text and example dialogues, single-file `.pt` saving, GPT2Chatbot.

Training reuses the package's Trainer run and formatting (conversations are rendered with the same
template the chat uses); chatting reuses ChatSession. Text files are cut into blocks of the model's
context length, optionally overlapping; the overlapping tokens are context only, never trained twice.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from .chat import ChatSession, GenerationSettings
from .checkpoint import CHECKPOINT_SUFFIXES, is_chatkit_checkpoint, load_checkpoint, save_checkpoint
from .datasets import default_val_split, read_conversations, read_text_file, split_train_val
from .device import choose_placement
from .errors import ChatkitError
from .formatting import IGNORE_INDEX, ensure_chat_template, ensure_pad_token
from .models import TRAINING_INFO_FILE, LoadedModel, ModelSource, load_model, resolve_model
from .training import (ExampleReport, TrainOptions, _print, perplexity, print_interrupted, run_trainer,
                       tokenize_examples)

DEFAULT_MODEL = "gpt2-small (124M)"


@dataclass
class ChatbotTrainOptions:
    model: str = DEFAULT_MODEL
    text_file: Optional[str] = None
    conversation_file: Optional[str] = None
    save_path: str = "trained_model.pt"
    epochs: float = 1.0
    batch_size: int = 4
    learning_rate: float = 5e-5
    max_length: Optional[int] = None  # None: the model's context length, at most 1024
    overlap: int = 0
    val_split: Optional[float] = None
    device: Optional[str] = None
    seed: int = 42


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


def _context_length(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024


def train_chatbot(options: ChatbotTrainOptions):
    """Fine-tune every weight on a text file and/or conversation examples; save.

    Returns (LoadedModel, metrics); metrics hold eval_loss_before and eval_loss, measured on the
    validation split, or on the training set when there was too little data for one."""
    if not options.text_file and not options.conversation_file:
        raise ChatkitError("give --text_file, --conversation_file, or both")
    placement = choose_placement(options.device)
    source = resolve_model(options.model)
    loaded = load_model(source, placement)
    model, tokenizer = loaded.model, loaded.tokenizer
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    block_size = min(options.max_length or 1024, _context_length(model))
    train_options = TrainOptions(
        data=[p for p in (options.text_file, options.conversation_file) if p], model=options.model,
        output=str(Path(options.save_path).with_suffix("")) + "-run" if _is_file_path(options.save_path)
        else str(Path(options.save_path) / "run"),
        epochs=options.epochs, lora=False, learning_rate=options.learning_rate, batch_size=options.batch_size,
        max_length=block_size, seed=options.seed, device=options.device, logging_steps=10,
    )
    train_examples, val_examples = [], []
    if options.text_file:
        text = read_text_file(options.text_file, "--text_file", "the text to learn")
        blocks = text_blocks(tokenizer(text, add_special_tokens=False)["input_ids"], block_size, options.overlap)
        split = options.val_split if options.val_split is not None else default_val_split(len(blocks))
        train_part, val_part = split_train_val(blocks, split, options.seed)
        train_examples += train_part
        val_examples += val_part
        _print(f"{options.text_file}: {len(blocks)} blocks of up to {block_size} tokens "
               f"({len(val_part)} held out for validation)")
    if options.conversation_file:
        conversations, report = read_conversations([options.conversation_file])
        _print(report.describe())
        split = options.val_split if options.val_split is not None else default_val_split(len(conversations))
        train_convs, val_convs = split_train_val(conversations, split, options.seed)
        train_examples += tokenize_examples(train_convs, tokenizer, train_options, ExampleReport())
        val_examples += tokenize_examples(val_convs, tokenizer, train_options, ExampleReport())
    measured_on = "validation" if val_examples else "training"
    # Without a validation split (little data), loss and perplexity are measured on the training set.
    run = run_trainer(model, tokenizer, train_examples, val_examples or train_examples, train_options, placement,
                      evaluate_first=True)
    if run.interrupted:
        print_interrupted(run, train_options, "train_chatbot.py")
        raise ChatkitError("training was interrupted; the model was not saved to --save_path")
    metrics = run.metrics
    before, after = metrics["eval_loss_before"], metrics["eval_loss"]
    _print(f"{measured_on} loss {before} -> {after}; perplexity {perplexity(before)} -> {perplexity(after)}")
    save_chatbot(model, tokenizer, options.save_path, base_model=source.spec)
    shutil.rmtree(Path(train_options.output) / "checkpoints", ignore_errors=True)
    _print(f"Saved to {options.save_path}")
    metrics["measured_on"] = measured_on
    return LoadedModel(model=model, tokenizer=tokenizer, source=source), metrics


def _is_file_path(path: str) -> bool:
    return Path(path).suffix.lower() in CHECKPOINT_SUFFIXES


def save_chatbot(model, tokenizer, path: str, base_model: str) -> None:
    """A .pt/.safetensors path: one safetensors file with config and tokenizer; otherwise a model directory."""
    if _is_file_path(path):
        save_checkpoint(model, tokenizer, path, base_model)
        return
    import json

    target = Path(path)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / TRAINING_INFO_FILE).write_text(json.dumps({"base_model": None, "method": "full",
                                                          "trained_from": base_model,
                                                          "chat_template": tokenizer.chat_template}, indent=2) + "\n")


class GPT2Chatbot:
    """A chatbot over a GPT-2 (or any causal) model: `chat(text)` keeps the conversation.

    The model loads on first use, so `GPT2Chatbot().load_model("trained_model.pt")` never fetches the
    base model first. `add_custom_examples` guides answers without training: the examples are placed
    in the prompt as earlier exchanges (after any system prompt, before the conversation), and when
    the context window would overflow the oldest examples are left out first.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL, device: Optional[str] = None, temperature: float = 0.7,
                 top_p: float = 0.9, max_new_tokens: int = 100, repetition_penalty: float = 1.1,
                 system_prompt: Optional[str] = None):
        self.model_name = model_name
        self.device = device
        self.settings = GenerationSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                           repetition_penalty=repetition_penalty)
        self.system_prompt = system_prompt
        self._examples: List[tuple] = []
        self._session: Optional[ChatSession] = None

    # generation settings, readable and settable
    temperature = property(lambda self: self.settings.temperature,
                           lambda self, value: setattr(self.settings, "temperature", value))
    top_p = property(lambda self: self.settings.top_p, lambda self, value: setattr(self.settings, "top_p", value))
    max_new_tokens = property(lambda self: self.settings.max_new_tokens,
                              lambda self, value: setattr(self.settings, "max_new_tokens", value))

    @property
    def session(self) -> ChatSession:
        if self._session is None:
            self._attach(load_model(resolve_model(self.model_name), choose_placement(self.device)))
        return self._session

    def _attach(self, loaded: LoadedModel) -> None:
        self._session = ChatSession(loaded, system_prompt=self.system_prompt, settings=self.settings)
        self._session.examples = self._examples

    def load_model(self, path: str) -> "GPT2Chatbot":
        """Load a trained model: a .pt from train_chatbot.py, a plain state-dict .pt (onto `model_name`),
        or a model directory."""
        placement = choose_placement(self.device)
        if Path(path).is_file():
            base = None if is_chatkit_checkpoint(path) else resolve_model(self.model_name)
            model, tokenizer, _ = load_checkpoint(path, base=base, placement=placement)
            self._attach(LoadedModel(model=model, tokenizer=tokenizer,
                                     source=ModelSource(spec=path, kind="checkpoint", path=path)))
        else:
            self._attach(load_model(resolve_model(path), placement))
        return self

    def chat(self, text: str) -> str:
        return self.session.reply(text)

    def reset(self) -> None:
        self.session.reset()

    @property
    def history(self) -> List[dict]:
        return self.session.history

    def add_custom_examples(self, examples: Iterable[dict]) -> None:
        """Add [{"user": ..., "bot": ...}] examples that guide answers (kept in order, oldest first)."""
        for index, example in enumerate(examples):
            if not isinstance(example, dict) or not isinstance(example.get("user"), str) \
                    or not isinstance(example.get("bot"), str):
                raise ChatkitError(f"custom example {index}: needs 'user' and 'bot' strings")
            self._examples.append((example["user"], example["bot"]))

    @property
    def examples(self) -> List[dict]:
        return [{"user": user, "bot": bot} for user, bot in self._examples]

    def clear_examples(self) -> None:
        self._examples.clear()

    def generate(self, prompt: str, max_new_tokens: Optional[int] = None) -> str:
        """Plain continuation of `prompt` (no chat formatting): GPT-2's original use."""
        import torch

        session = self.session
        ids = session.tokenizer(prompt, return_tensors="pt")["input_ids"].to(session.device)
        settings = dataclasses.replace(self.settings, max_new_tokens=max_new_tokens or self.settings.max_new_tokens)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with torch.no_grad():
            output = session.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            pad_token_id=session.tokenizer.pad_token_id or session.tokenizer.eos_token_id,
                                            **settings.generate_kwargs())
        return session.tokenizer.decode(output[0][ids.shape[1]:], skip_special_tokens=True)
