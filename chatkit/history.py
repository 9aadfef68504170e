"""A chat's conversation and its prompt: the history, the system prompt and guiding examples, the prompt for
the next answer fitted to the context window (oldest examples, then oldest exchanges left out), saving;
and the key/value cache kept between turns, reused only for the prompt's unchanged beginning."""

from __future__ import annotations

import copy
import functools
import os
from typing import List, Optional

from .errors import ChatkitError
from .files import write_json
from .formatting import encode_prompt, fit_to_template, split_exchanges, with_system_prompt


class KeptCache:
    """The key/value cache of what the model has seen, and those tokens: reused for a new prompt's longest
    shared beginning, cut back to it, so reuse never changes what the model is conditioned on."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.cache = None
        self.ids: List[int] = []

    def clear(self) -> None:
        self.cache, self.ids = None, []

    def reusable(self, ids: List[int]):
        """The kept cache, cut back to the longest prefix it shares with the new prompt, or None."""
        if not self.enabled or self.cache is None:
            return None
        common = 0
        limit = min(len(ids) - 1, len(self.ids))  # at least one new token must be fed
        while common < limit and ids[common] == self.ids[common]:
            common += 1
        if common == 0:
            return None
        surplus = self.cache.get_seq_length() - common
        if surplus > 0:
            self.cache.crop(-surplus)  # this cache API takes the number of tokens to remove, negated
        return self.cache

    def keep(self, cache, output: List[int]) -> None:
        """What generation left: the cache and the tokens it holds."""
        if self.enabled and cache is not None:
            self.cache = cache
            self.ids = output[: cache.get_seq_length()]


class Conversation:
    """The conversation side of a ChatSession (its base class): `history`, `system_prompt`, the guiding
    `examples`, and the prompt for the next answer. The session sets `tokenizer`, `settings`, `max_context`,
    `on_notice` and `cache` (a KeptCache)."""

    @property
    def new_tokens(self) -> int:
        """The answer's token budget: --max-new-tokens, but never more than half the context window."""
        return max(1, min(self.settings.max_new_tokens, self.max_context // 2))

    def _start_conversation(self, system_prompt: Optional[str]) -> None:
        self.system_prompt = system_prompt
        self.history: List[dict] = []
        # Guiding examples: (user, assistant) pairs placed as earlier exchanges before the conversation.
        self.examples: List[tuple] = []
        self.examples_in_prompt = 0  # how many of the newest examples fitted in the last prompt
        self.trimmed_notice_given = False
        self.fit_notices_given: set = set()

    def reset(self) -> None:
        self.history = []
        self.cache.clear()

    def set_system_prompt(self, text: Optional[str]) -> None:
        self.system_prompt = text or None
        self.cache.clear()

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


def _most_that_fit(count: int, fits) -> Optional[int]:
    """The largest n in 0..count with fits(n), for a fits() that holds up to some n and not beyond; None if none."""
    if not fits(0):
        return None
    low, high = 0, count
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low
