"""A chat session with a loaded model: generation, streamed, with the trained formatting; the conversation,
its prompt and the kept key/value cache are history.py's."""

from __future__ import annotations

import copy
import functools
import sys
import threading
from typing import Callable, Iterator, List, Optional

from .errors import ChatkitError
from .files import read_training_info
from .formatting import check_chat_tokens, clean_text, ensure_chat_template, pad_token_id, stop_token_ids
from .history import Conversation, KeptCache
from .models import LoadedModel, context_length, load_model, resolve_model
from .options import GenerationSettings

__all__ = ["ChatSession", "GenerationSettings"]


class ChatSession(Conversation):
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
        self.settings = settings or GenerationSettings()
        self.stop_ids = stop_token_ids(self.tokenizer)
        check_chat_tokens(self.tokenizer, self.model.get_input_embeddings().weight.shape[0], self.source.describe())
        self.max_context = max_context or context_length(self.model.config)
        self._start_conversation(system_prompt if system_prompt is not None else info.get("system_prompt"))
        self.on_notice: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
        self.cache = KeptCache(reuse_cache)
        self.generating = threading.Lock()  # held by a thread generating an answer: the cache has one writer
        self.usage = (0, 0)  # the last answer's (prompt tokens, answer tokens)
        self.adapter = adapter  # False: a LoRA model answers as its base model, with the adapter switched off
        self.loaded = loaded

    @property
    def reuse_cache(self) -> bool:
        """Whether the key/value cache is kept between turns (--no-cache-reuse: not)."""
        return self.cache.enabled

    @reuse_cache.setter
    def reuse_cache(self, value: bool) -> None:
        self.cache.enabled = value

    @property
    def _cache(self):
        return self.cache.cache  # the kept key/value cache: None before an answer, or with reuse off

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
        cache = self.cache.reusable(ids)
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
        self.cache.keep(cache, output)
        answer = self.tokenizer.decode(output[len(ids):], skip_special_tokens=True).strip()
        self.usage = (len(ids), len(output) - len(ids))
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]

    def reply(self, user_text: str) -> str:
        """The whole answer to one message (history kept)."""
        for _ in self.stream(user_text):
            pass
        return self.history[-1]["content"]

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


def _stopping_criteria(stop):
    """Generation stops at the next token once `stop` (a threading.Event) is set."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class WhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([WhenAsked()])
