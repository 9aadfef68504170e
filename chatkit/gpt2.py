"""The GPT-2 chatbot: training on text and example dialogues, single-file `.pt` saving, GPT2Chatbot.

Training reuses the package's Trainer run and formatting (conversations are rendered with the same
template the chat uses); chatting reuses ChatSession. Text files are cut into blocks of the model's
context length, optionally overlapping; the overlapping tokens are context only, never trained twice.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from .chat import ChatSession
from .checkpoint import CHECKPOINT_SUFFIXES, save_checkpoint
from .datasets import default_val_split, read_conversations, read_text_file, split_train_val
from .device import choose_placement
from .errors import ChatkitError
from .examples import ExampleReport, text_blocks, tokenize_examples
from .files import training_info, write_training_info
from .formatting import ensure_chat_template, ensure_pad_token, pad_token_id
from .models import LoadedModel, context_length, load_model, resolve_model
from .options import GPT2_MODEL, ChatbotTrainOptions, GenerationSettings
from .output import say

__all__ = ["GPT2Chatbot", "ChatbotTrainOptions", "train_chatbot", "text_blocks"]
DEFAULT_MODEL = GPT2_MODEL
BLOCK_TOKENS = 1024  # GPT-2's context; a longer-context model still trains on blocks of this size by default


def _examples(options: ChatbotTrainOptions, tokenizer, block_size: int):
    """Training and validation examples from the text file (blocks) and the dialogues (conversations)."""
    train, val = [], []
    if options.text_file:
        text = read_text_file(options.text_file, "--text_file", "the text to learn")
        blocks = text_blocks(tokenizer(text, add_special_tokens=False)["input_ids"], block_size, options.overlap)
        split = options.val_split if options.val_split is not None else default_val_split(len(blocks))
        train_part, val_part = split_train_val(blocks, split, options.seed)
        train, val = train + train_part, val + val_part
        say(f"{options.text_file}: {len(blocks)} blocks of up to {block_size} tokens "
            f"({len(val_part)} held out for validation)")
    if options.conversation_file:
        conversations, report = read_conversations([options.conversation_file])
        say(report.describe())
        split = options.val_split if options.val_split is not None else default_val_split(len(conversations))
        train_convs, val_convs = split_train_val(conversations, split, options.seed)
        train += tokenize_examples(train_convs, tokenizer, block_size, report=ExampleReport())
        val += tokenize_examples(val_convs, tokenizer, block_size)
    return train, val


def _trainer_arguments(options: ChatbotTrainOptions, placement, has_val: bool):
    from .engine import ChatTrainingArguments

    import tempfile

    # A folder of this run's own, named so that it cannot be one of the user's: it is removed after saving.
    save_path = Path(options.save_path)
    beside = save_path.parent if _is_file_path(options.save_path) else save_path
    beside.mkdir(parents=True, exist_ok=True)
    checkpoints = tempfile.mkdtemp(prefix=f".{save_path.stem}-run-", dir=beside)
    return ChatTrainingArguments.for_run(
        checkpoints_dir=str(Path(checkpoints) / "checkpoints"), epochs=options.epochs, batch_size=options.batch_size,
        learning_rate=options.learning_rate, device=placement.device, dtype=placement.dtype, has_val=has_val,
        logging_steps=10, seed=options.seed)


def train_chatbot(options: ChatbotTrainOptions):
    """Fine-tune every weight on a text file and/or conversation examples; save.

    Returns (LoadedModel, metrics); metrics hold eval_loss_before and eval_loss, measured on the
    validation split, or on the training set when there was too little data for one."""
    from .engine import perplexity, run_trainer

    if not options.text_file and not options.conversation_file:
        raise ChatkitError("give --text_file, --conversation_file, or both")
    if os.path.exists(options.save_path) and not options.overwrite:
        raise ChatkitError(f"--save_path {options.save_path} exists already; pass --overwrite to replace it, or "
                           "name another file")
    placement = choose_placement(options.device, options.dtype)
    source = resolve_model(options.model)
    loaded = load_model(source, placement, trust_remote_code=options.trust_remote_code)
    model, tokenizer = loaded.model, loaded.tokenizer
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    block_size = min(options.max_length or BLOCK_TOKENS, context_length(model.config))
    train_examples, val_examples = _examples(options, tokenizer, block_size)
    measured_on = "validation" if val_examples else "training"
    # Without a validation split (little data), loss and perplexity are measured on the training set.
    arguments = _trainer_arguments(options, placement, has_val=True)
    run = run_trainer(model, tokenizer, train_examples, val_examples or train_examples, arguments, evaluate_first=True)
    if run.interrupted:
        raise ChatkitError(f"training was interrupted; the model was not saved to --save_path (the last "
                           f"checkpoint is in {run.checkpoint})")
    metrics = run.metrics
    before, after = metrics["eval_loss_before"], metrics["eval_loss"]
    say(f"{measured_on} loss {before} -> {after}; perplexity {perplexity(before)} -> {perplexity(after)}")
    save_chatbot(model, tokenizer, options.save_path, base_model=source.spec)
    shutil.rmtree(Path(arguments.output_dir).parent, ignore_errors=True)
    say(f"Saved to {options.save_path}")
    metrics["measured_on"] = measured_on
    return LoadedModel(model=model, tokenizer=tokenizer, source=source), metrics


def _is_file_path(path: str) -> bool:
    return Path(path).suffix.lower() in CHECKPOINT_SUFFIXES


def save_chatbot(model, tokenizer, path: str, base_model: str) -> None:
    """A .pt/.safetensors path: one safetensors file with config and tokenizer; otherwise a model directory."""
    if _is_file_path(path):
        save_checkpoint(model, tokenizer, path, base_model)
        return
    target = Path(path)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    write_training_info(target, training_info("full", tokenizer.chat_template, trained_from=base_model))


class GPT2Chatbot:
    """A chatbot over a GPT-2 (or any causal) model: `chat(text)` keeps the conversation.

    The model loads on first use, so `GPT2Chatbot().load_model("trained_model.pt")` never fetches the
    base model first. `add_custom_examples` guides answers without training: the examples are placed
    in the prompt as earlier exchanges (after any system prompt, before the conversation), and when
    the context window would overflow the oldest examples are left out first.
    """

    def __init__(self, model_name: str = DEFAULT_MODEL, device: Optional[str] = None,
                 system_prompt: Optional[str] = None, dtype: Optional[str] = None, **generation):
        """`generation`: any GenerationSettings field (temperature, top_p, max_new_tokens, repetition_penalty,
        seed); the rest keep the defaults the chat uses."""
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.settings = GenerationSettings(**generation)
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
            self._attach(load_model(resolve_model(self.model_name), choose_placement(self.device, self.dtype)))
        return self._session

    def _attach(self, loaded: LoadedModel) -> None:
        self._session = ChatSession(loaded, system_prompt=self.system_prompt, settings=self.settings)
        self._session.examples = self._examples

    def load_model(self, path: str) -> "GPT2Chatbot":
        """Load a trained model: a .pt from train_chatbot.py, a plain state-dict .pt (onto `model_name`),
        or a model directory."""
        placement = choose_placement(self.device, self.dtype)
        self._attach(load_model(resolve_model(path), placement, base=self.model_name))
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
                                            pad_token_id=pad_token_id(session.tokenizer),
                                            **settings.generate_kwargs())
        return session.tokenizer.decode(output[0][ids.shape[1]:], skip_special_tokens=True)
