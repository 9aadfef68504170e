"""A chat session with a loaded model: history, the trained formatting, streaming, KV-cache reuse."""

from __future__ import annotations

import copy
import functools
import os
import sys
import threading
from typing import Callable, Iterator, List, Optional

from .errors import ChatkitError
from .files import read_training_info, write_json
from .formatting import (check_chat_tokens, clean_text, encode_prompt, ensure_chat_template, fit_to_template, pad_token_id,
                         split_exchanges, stop_token_ids, with_system_prompt)
from .models import LoadedModel, context_length, load_model, resolve_model
from .options import GenerationSettings

__all__ = ["ChatSession", "GenerationSettings"]


class ChatSession:
    """Load once, then `reply(text)`; keeps `history` and reuses the key/value cache across turns.

    The prompt is always rendered with the same function that training used, from the full history;
    the cache is reused only for the part of the new prompt that is identical to what the model has
    already seen, so reuse never changes what the model is conditioned on.
    """

    def __init__(self, model: str | LoadedModel | None = None, *, device: Optional[str] = None,
                 dtype: Optional[str] = None, system_prompt: Optional[str] = None,
                 settings: Optional[GenerationSettings] = None, reuse_cache: bool = True,
                 max_context: Optional[int] = None, trust_remote_code: bool = False, adapter: bool = True):
        from .device import choose_placement

        if isinstance(model, LoadedModel):
            loaded = model
            self.placement = None
        else:
            self.placement = choose_placement(device, dtype)
            loaded = load_model(resolve_model(model), self.placement, trust_remote_code=trust_remote_code)
        self.model = loaded.model
        self.model.eval()
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        ensure_chat_template(self.tokenizer)
        info = read_training_info(self.source.path) if self.source.kind in ("adapter", "directory") else {}
        if info.get("chat_template"):
            self.tokenizer.chat_template = info["chat_template"]
        self.system_prompt = system_prompt if system_prompt is not None else info.get("system_prompt")
        self.settings = settings or GenerationSettings()
        self.reuse_cache = reuse_cache
        self.stop_ids = stop_token_ids(self.tokenizer)
        check_chat_tokens(self.tokenizer, self.model.get_input_embeddings().weight.shape[0], self.source.describe())
        self.max_context = max_context or context_length(self.model.config)
        self.history: List[dict] = []
        # Guiding examples: (user, assistant) pairs placed as earlier exchanges before the conversation.
        self.examples: List[tuple] = []
        self.examples_in_prompt = 0  # how many of the newest examples fitted in the last prompt
        self.trimmed_notice_given = False
        self.fit_notices_given: set = set()
        self.on_notice: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
        self._cache = None
        self._cache_ids: List[int] = []
        self.generating = threading.Lock()  # held by a thread generating an answer: the cache has one writer
        self.usage = (0, 0)  # the last answer's (prompt tokens, answer tokens)
        self.adapter = adapter  # False: a LoRA model answers as its base model, with the adapter switched off
        self.loaded = loaded

    @property
    def new_tokens(self) -> int:
        """The answer's token budget: --max-new-tokens, but never more than half the context window."""
        return max(1, min(self.settings.max_new_tokens, self.max_context // 2))

    @property
    def device(self):
        return next(self.model.parameters()).device

    def device_description(self) -> str:
        """Where the model runs, e.g. "cpu (float32)"."""
        param = next(self.model.parameters())
        return f"{param.device.type} ({str(param.dtype).replace('torch.', '')})"

    def describe(self) -> str:
        return f"{self.source.describe()} on {self.device_description()}"

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def base_twin(self) -> "ChatSession":
        """A session answering as the base model: the same weights with the LoRA adapter switched off."""
        if not self.has_adapter:
            raise ChatkitError(f"{self.source.spec} is not a LoRA adapter, so it has no base model to switch to")
        twin = ChatSession(self.loaded, system_prompt=self.system_prompt, settings=copy.copy(self.settings),
                           reuse_cache=self.reuse_cache, max_context=self.max_context, adapter=False)
        twin.tokenizer.chat_template = self.tokenizer.chat_template
        return twin

    def _weights(self):
        """The context generation runs in: the adapter switched off for a base twin."""
        import contextlib

        return contextlib.nullcontext() if self.adapter or not self.has_adapter else self.model.disable_adapter()

    # ------------------------------------------------------------------ history

    def reset(self) -> None:
        self.history = []
        self._cache, self._cache_ids = None, []

    def set_system_prompt(self, text: Optional[str]) -> None:
        self.system_prompt = text or None
        self._cache, self._cache_ids = None, []

    def messages(self, user_text: Optional[str] = None) -> List[dict]:
        messages = list(self.history)
        if user_text is not None:
            messages.append({"role": "user", "content": user_text})
        return with_system_prompt(messages, self.system_prompt)

    def prompt_messages(self, user_text: str, examples: Optional[int] = None,
                        history: Optional[List[dict]] = None) -> List[dict]:
        """System prompt, then the newest `examples` guiding examples, then the conversation (`history`,
        by default the session's), then the message."""
        count = len(self.examples) if examples is None else examples
        shown = self.examples[len(self.examples) - count:] if count else []
        prior = [m for user, bot in shown for m in ({"role": "user", "content": user},
                                                   {"role": "assistant", "content": bot})]
        conversation = list(self.history if history is None else history) + [{"role": "user", "content": user_text}]
        return with_system_prompt(prior + conversation, self.system_prompt)

    def prompt_ids(self, user_text: str) -> List[int]:
        """Tokens of the prompt for the next answer. When it would not fit the context window, the
        oldest guiding examples are left out first, then the oldest exchanges of the conversation.

        How many go is found by halving (a few renders, however long the history), since leaving out
        more never makes the prompt longer."""
        budget = self.max_context - self.new_tokens
        self._check_message_fits(user_text, budget)
        for note in fit_to_template(self.prompt_messages(user_text), self.tokenizer)[1]:
            if note not in self.fit_notices_given:
                self.fit_notices_given.add(note)
                self.on_notice(f"(Note: {note}.)")
        _, exchanges = split_exchanges(self.history)

        def ids_for(shown: int, dropped: int) -> List[int]:
            history = [m for exchange in exchanges[dropped:] for m in exchange]
            return encode_prompt(self.prompt_messages(user_text, shown, history), self.tokenizer)

        shown, dropped = len(self.examples), 0
        ids = ids_for(shown, dropped)
        if len(ids) > budget:
            shown = _most_that_fit(len(self.examples), lambda n: len(ids_for(n, 0)) <= budget)
            if shown is None:
                shown = 0
                kept = _most_that_fit(len(exchanges), lambda n: len(ids_for(0, len(exchanges) - n)) <= budget)
                dropped = len(exchanges) - (kept or 0)
            ids = ids_for(shown, dropped)
        if dropped:
            self._drop_oldest_exchanges(exchanges, dropped)
        self.examples_in_prompt = shown
        if len(ids) > budget:
            raise ChatkitError(
                f"the message is {len(ids)} tokens, more than this model's context of {self.max_context} "
                f"allows with {self.new_tokens} tokens kept for the answer; shorten it or lower --max-new-tokens"
            )
        return ids

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token stands for (the vocabulary's longest entry)."""
        return max((len(token) for token in self.tokenizer.get_vocab()), default=1)

    def _check_message_fits(self, user_text: str, budget: int) -> None:
        """A message that cannot fit the context on its own is refused before the prompt is rendered: at once
        when its characters outnumber what `budget` tokens can hold (a few MB takes a tokenizer a minute),
        else after tokenizing it once (a prompt is rendered several times while history is fitted)."""
        longest = self.longest_token_chars
        if len(user_text) > 2 * budget * longest:  # 2: normalisation may join characters
            raise ChatkitError(
                f"the message is {len(user_text):,} characters, more than this model's context of "
                f"{self.max_context} tokens can hold with {self.new_tokens} tokens kept for the answer; shorten it")
        count = len(self.tokenizer(user_text, add_special_tokens=False)["input_ids"])
        if count > budget:
            raise ChatkitError(
                f"the message is {count} tokens, more than this model's context of {self.max_context} "
                f"allows with {self.new_tokens} tokens kept for the answer; shorten it or lower --max-new-tokens"
            )

    def _drop_oldest_exchanges(self, exchanges: List[List[dict]], count: int) -> None:
        del self.history[:sum(len(exchange) for exchange in exchanges[:count])]
        if not self.trimmed_notice_given:
            self.trimmed_notice_given = True
            self.on_notice("(The conversation is longer than the model's context window: the oldest exchanges "
                           "are being left out.)")

    # ------------------------------------------------------------------ generation

    def stream(self, user_text: str) -> Iterator[str]:
        """Yield the answer piece by piece as it is generated; history is updated at the end.

        Stopped early (Ctrl-C, or the caller closing the generator), generation ends at the next token
        and the part of the answer given so far is kept in the history. Callers that share a session across
        threads hold `generating` around a whole answer (the API server does): the key/value cache has one
        writer at a time.
        """
        import torch
        from transformers import TextIteratorStreamer

        user_text, _ = clean_text(user_text)  # a broken character in the input must not end the session
        ids = self.prompt_ids(user_text)
        input_ids = torch.tensor([ids], device=self.device)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      eos_token_id=self.stop_ids, pad_token_id=pad_token_id(self.tokenizer),
                      **(self.settings.generate_kwargs() | {"max_new_tokens": self.new_tokens}))
        cache = self._reusable_cache(ids)
        if cache is None and self.reuse_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        if cache is not None:
            kwargs[generate_cache_name()] = cache
        if self.settings.seed is not None:
            torch.manual_seed(self.settings.seed)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        kwargs.update(streamer=streamer, stopping_criteria=_stopping_criteria(stop))
        result = {}

        def run():
            try:
                with torch.no_grad(), self._weights():
                    result["output"] = self.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            for piece in streamer:
                yield piece
        finally:
            stop.set()  # a no-op when generation has finished; otherwise it ends at the next token
            thread.join()
            if "output" in result:
                self._keep(user_text, ids, result["output"][0].tolist(), cache)
        if "error" in result:
            raise result["error"]

    def _keep(self, user_text: str, ids: List[int], output: List[int], cache) -> None:
        """Record the exchange (and the cache of what the model has now seen)."""
        if self.reuse_cache and cache is not None:
            self._cache = cache
            self._cache_ids = output[: self._cache.get_seq_length()]
        answer = self.tokenizer.decode(output[len(ids):], skip_special_tokens=True).strip()
        self.usage = (len(ids), len(output) - len(ids))
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def reply(self, user_text: str) -> str:
        """The whole answer to one message (history kept)."""
        for _ in self.stream(user_text):
            pass
        return self.history[-1]["content"]

    def _reusable_cache(self, ids: List[int]):
        """The kept cache, cut back to the longest prefix it shares with the new prompt, or None."""
        if not self.reuse_cache or self._cache is None:
            return None
        common = 0
        limit = min(len(ids) - 1, len(self._cache_ids))  # at least one new token must be fed
        while common < limit and ids[common] == self._cache_ids[common]:
            common += 1
        if common == 0:
            return None
        surplus = self._cache.get_seq_length() - common
        if surplus > 0:
            self._cache.crop(-surplus)  # this cache API takes the number of tokens to remove, negated
        return self._cache

    # ------------------------------------------------------------------ saving

    def save(self, path: str, overwrite: bool = False) -> int:
        """Write the conversation as one training record ({"messages": [...]}) in a JSON array.

        A file that exists is kept unless `overwrite`: it may be a training file of many conversations."""
        messages = self.messages()
        path = os.path.expanduser(path)
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatkitError("nothing to save yet: the conversation has no answer")
        if os.path.isdir(path):
            raise ChatkitError(f"{path} is a folder; name a file, such as {os.path.join(path, 'chat.json')}")
        if os.path.exists(path) and not overwrite:
            raise ChatkitError(f"{path} exists already and was kept; /save! {path} replaces it, or name another file")
        write_json(path, [{"messages": copy.deepcopy(messages)}])
        return len(messages)


@functools.lru_cache(maxsize=None)
def generate_cache_name() -> str:
    """The name `generate` takes a key/value cache by: `cache` in newer transformers (`past_key_values` is
    deprecated there and goes in 6.0), `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def base_session(session: ChatSession) -> ChatSession:
    """The model `session` was trained from, to compare answers with: for a LoRA adapter the same weights
    with the adapter off; for a merged or fully trained model its base, loaded beside it."""
    if session.has_adapter:
        return session.base_twin()
    info = read_training_info(session.source.path) if session.source.kind == "directory" else {}
    if not info:
        raise ChatkitError(f"--compare: {session.source.spec} was not trained by this toolkit, so there is no base "
                           "model to compare with; pass a train_chatgpt_model.py output folder")
    trained_from = (info.get("options") or {}).get("model")
    placement = session.placement
    return ChatSession(trained_from, device=placement.device if placement else None,
                       dtype=placement.dtype if placement else None, system_prompt=session.system_prompt,
                       settings=copy.copy(session.settings), reuse_cache=session.reuse_cache)


def _most_that_fit(count: int, fits) -> Optional[int]:
    """The largest n in 0..count with fits(n), for a fits() that holds up to some n and not beyond; None if none."""
    if not fits(0):
        return None
    low, high = 0, count
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def _stopping_criteria(stop):
    """Generation stops at the next token once `stop` (a threading.Event) is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class WhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([WhenAsked()])
