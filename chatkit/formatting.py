"""Turning messages into model text and training labels: the one formatting used by training and chat.

A model with a chat template uses it. A model without one (GPT-2, DialoGPT) gets FALLBACK_CHAT_TEMPLATE,
which training stores as the tokenizer's chat template of the trained model, so chat finds it there:

    <|system|>
    You are terse.
    <|user|>
    Hi
    <|assistant|>
    Hello!<EOS>

Each message is a role tag on its own line, then the content, then a newline; every assistant turn is
closed by the tokenizer's EOS token, which the model learns to produce so that generation stops there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ChatkitError

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no character, cannot be written
IGNORE_INDEX = -100  # label value the loss skips


MAX_MESSAGE_CHARS = 1_000_000  # one message's text: far more than any model's context; longer is damaged data

def clean_text(text: str) -> Tuple[str, int]:
    """`text` with every lone surrogate (from a broken `\\ud800` escape or an undecodable byte) replaced by
    U+FFFD, and how many there were."""
    return _LONE_SURROGATE.subn("\ufffd", text)


def has_own_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def ensure_chat_template(tokenizer, family=None) -> str:
    """Give a tokenizer without a chat template the fallback one; returns the template in use.

    For training (`family` given): a template that renders older answers differently once the
    conversation grows (Qwen3's drops their thinking block) is replaced by the family's training
    template, so that every answer is trained exactly as chat will later show it."""
    if isinstance(getattr(tokenizer, "chat_template", None), dict):  # named templates: chat uses "default"
        named = tokenizer.chat_template
        tokenizer.chat_template = named.get("default") or next(iter(named.values()), None)
    if not has_own_template(tokenizer):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    elif family is not None and family.training_template and not _extends_cleanly(tokenizer):
        tokenizer.chat_template = family.training_template
    check_template(tokenizer)
    return tokenizer.chat_template


_PROBE = [{"role": "user", "content": "chatkit probe question"}, {"role": "assistant", "content": "chatkit probe answer"}]
_CHECKED: set = set()


def check_template(tokenizer) -> None:
    """Refuse a chat template that would train on nothing or chat garbage: one that leaves out the messages'
    text; one whose generation prompt adds nothing where a conversation opens an answer with more (the
    assistant's header), so the model could not tell where its answer starts (Mistral's [/INST] closes the
    user's turn and opens the answer at once: nothing is left out there); one that gives no token to end an
    answer with."""
    key = (tokenizer.chat_template, tokenizer.eos_token, len(tokenizer))
    if key in _CHECKED:
        return
    text = render(_PROBE, tokenizer)
    if any(message["content"] not in text for message in _PROBE):
        raise ChatkitError(f"{template_file(tokenizer)}: its chat template leaves out the messages' text, so "
                           "nothing would be learned or answered; fix the template there, or use another model")
    prompt, answer_at = render(_PROBE[:1], tokenizer, add_generation_prompt=True), text.index(_PROBE[1]["content"])
    if prompt == render(_PROBE[:1], tokenizer) and text.startswith(prompt) and text[len(prompt):answer_at].strip():
        raise ChatkitError(f"{template_file(tokenizer)}: its chat template has no generation prompt "
                           "(add_generation_prompt leaves out the assistant's header), so the model could not tell "
                           "where its answer starts; add one to the template there, or use another model")
    if not stop_token_ids(tokenizer):
        raise ChatkitError(f"{template_file(tokenizer)}: the tokenizer has no end-of-sequence token and its chat "
                           "template ends an answer with no special token, so a model could never end its answers; "
                           "set \"eos_token\" in the tokenizer's tokenizer_config.json")
    _CHECKED.add(key)


def check_chat_tokens(tokenizer, rows: int, where: str) -> None:
    """The tokens every chat uses (its template's, its stop and pad tokens) must have rows in the model's
    embedding: chat tokens added to a tokenizer and not to its model would fail the first answer. Other added
    tokens past the rows are left alone (transformers' GGUF reader adds a `<mask>` to Gemma's, never used)."""
    used = set(encode_text(render(_PROBE, tokenizer), tokenizer)[0]) | set(stop_token_ids(tokenizer))
    used |= {i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id) if i is not None}
    past = sorted(i for i in used if i >= rows)
    if past:
        raise ChatkitError(f"{where}: its chat uses tokens {', '.join(map(str, tokenizer.convert_ids_to_tokens(past)))} "
                           f"(ids from {past[0]}) but the model's embedding has only {rows} rows (chat tokens added "
                           "to the tokenizer and not to the model, most likely); use the tokenizer the model was "
                           "trained with")


def _extends_cleanly(tokenizer) -> bool:
    """Whether a two-exchange conversation renders as the one-exchange one followed by more text."""
    one = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    two = one + [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    return render(two, tokenizer).startswith(render(one, tokenizer))


@dataclass(frozen=True)
class TemplateRules:
    """What a chat template accepts, learned by rendering small probes."""

    system_role: bool  # False: a system message is refused (Gemma 2, Mistral v0.1)
    alternating: bool  # True: roles must alternate user/assistant (Gemma, Mistral)


_RULES: Dict[str, TemplateRules] = {}
FOLDED_SYSTEM = "system prompts folded into the first user turn (this model's template has no system role)"
MERGED_TURNS = "consecutive turns of one role merged (this model's template needs them to alternate)"
DROPPED_OPENING = "opening answers before any user turn left out (this model's template starts with the user)"


def template_rules(tokenizer) -> TemplateRules:
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    if template not in _RULES:
        user, answer = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
        _RULES[template] = TemplateRules(
            system_role=_renders(tokenizer, [{"role": "system", "content": "s"}, user, answer]),
            alternating=not _renders(tokenizer, [user, user, answer]) or not _renders(tokenizer, [answer, user, answer]))
    return _RULES[template]


def _renders(tokenizer, messages) -> bool:
    try:
        _apply_template(messages, tokenizer, False)
        return True
    except ChatkitError:
        return False


def fit_to_template(messages: Sequence[dict], tokenizer) -> Tuple[List[dict], List[str]]:
    """The conversation in a form the template accepts, and what was changed (FOLDED_SYSTEM and the like).

    A system message the template refuses goes before the first user message's text; where roles must
    alternate, consecutive turns of one role become one turn (their texts joined by a blank line) and
    answers before the first user turn are left out."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    rules = template_rules(tokenizer)
    notes = []
    if not rules.system_role and messages and messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            messages.insert(0, {"role": "user", "content": system})
        else:
            first_user["content"] = f"{system}\n\n{first_user['content']}"
        notes.append(FOLDED_SYSTEM)
    if rules.alternating:
        head = 1 if messages and messages[0]["role"] == "system" else 0
        while len(messages) > head and messages[head]["role"] == "assistant":
            del messages[head]
            if DROPPED_OPENING not in notes:
                notes.append(DROPPED_OPENING)
        merged = messages[:head + 1]
        for message in messages[head + 1:]:
            if message["role"] == merged[-1]["role"]:
                merged[-1]["content"] += "\n\n" + message["content"]
                if MERGED_TURNS not in notes:
                    notes.append(MERGED_TURNS)
            else:
                merged.append(message)
        messages = merged
    return messages, notes


def ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token, preferring an existing special token that is not EOS.

    Labels are built from positions (padding is always IGNORE_INDEX), so even where the pad token
    has to be EOS itself (GPT-2 has no other), the EOS that ends an assistant turn is still trained.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    for candidate in (tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def render(messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The model text for a conversation: the tokenizer's chat template (or the fallback), given the
    conversation in a form it accepts (fit_to_template)."""
    return _apply_template(fit_to_template(messages, tokenizer)[0], tokenizer, add_generation_prompt)


def template_file(tokenizer) -> str:
    """Where a tokenizer's chat template was read from, for messages."""
    folder = getattr(tokenizer, "name_or_path", "") or "the model"
    for name in ("chatkit.json", "chat_template.jinja", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return f"the chat template of {folder}"


def _apply_template(messages: Sequence[dict], tokenizer, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:  # a syntax error, a sandbox refusal, or the template's own raise_exception
        line = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        raise ChatkitError(f"{template_file(tokenizer)}: its chat template fails{line}: {exc.message or exc}; "
                           "fix the template there, or train from a model whose template works") from None


def _special_strings(tokenizer) -> List[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return sorted((s for s in specials if s), key=len, reverse=True)


def _turn_end(span: str, content_end: int, specials: Sequence[str]) -> int:
    """Index in `span` just past the end-of-turn token that follows the content.

    The end-of-turn token is the first special token after the content (`<|im_end|>`, `<|eot_id|>`,
    `</s>`, the fallback's EOS, ...); without one, the span up to its trailing whitespace.
    """
    best = None
    for special in specials:
        at = span.find(special, content_end)
        if at != -1 and (best is None or at < best[0]):
            best = (at, at + len(special))
    if best is not None:
        return best[1]
    return len(span.rstrip())


def assistant_char_spans(messages: Sequence[dict], tokenizer) -> Tuple[str, List[Tuple[int, int]]]:
    """Render a conversation and find, for each assistant turn, the characters the model must learn.

    A turn's span is its content plus the end-of-turn token after it. It is found by rendering the
    conversation up to the turn with the generation prompt, then with the turn: the difference is
    what the model produces. Works for any template, the fallback included.
    """
    messages = fit_to_template(messages, tokenizer)[0]
    text = render(messages, tokenizer)
    specials = _special_strings(tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], tokenizer, add_generation_prompt=True) if index else ""
        upto = render(messages[: index + 1], tokenizer)
        if upto.startswith(prompt):
            start = len(prompt)
        else:  # templates that rewrite earlier turns: find the content after the common prefix
            common = 0
            while common < min(len(prompt), len(upto)) and prompt[common] == upto[common]:
                common += 1
            start = common
        span = upto[start:]
        content = message["content"]
        at = span.find(content) if content else -1
        if at == -1 and content.strip():
            content = content.strip()
            at = span.find(content)
        content_start, content_end = (at, at + len(content)) if at != -1 else (0, 0)
        end = _turn_end(span, content_end, specials)
        if not text.startswith(upto[: start + end]):
            raise ChatkitError(
                "the chat template renders a conversation differently when it is extended; "
                "this model's template cannot be used for training (use --train-on-prompt)"
            )
        spans.append((start + content_start, start + end))
    return text, spans


_MASK = "\x01"  # stands in, character for character, for a control string typed inside a message


def literal_ranges(messages: Sequence[dict], tokenizer, text: str, add_generation_prompt: bool = False):
    """Where `text` (the rendering of `messages`) has a control string such as `<|im_end|>` that a message
    itself contains: those characters are text the user typed, not the template's markers.

    Found by rendering again with each such string in the messages masked: what remains is the template's."""
    specials = _special_strings(tokenizer)
    if not any(special in message["content"] for message in messages for special in specials):
        return []
    masked = []
    for message in messages:
        content = message["content"]
        for special in specials:
            content = content.replace(special, _MASK * len(special))
        masked.append(dict(message, content=content))
    template_only = render(masked, tokenizer, add_generation_prompt)
    if len(template_only) != len(text):
        return []
    ranges, at = [], 0
    while at < len(text):
        found = next((s for s in specials if text.startswith(s, at) and not template_only.startswith(s, at)), None)
        if found:
            ranges.append((at, at + len(found)))
            at += len(found)
        else:
            at += 1
    return ranges


def encode_text(text: str, tokenizer, literal: Sequence[Tuple[int, int]] = ()) -> Tuple[List[int], List[tuple]]:
    """Token ids and character offsets of `text`; the `literal` ranges are split as plain text, never
    matched as control tokens."""
    ids, offsets, at = [], [], 0
    pieces = []
    for start, end in literal:
        pieces += [(at, start, False), (start, end, True)]
        at = end
    pieces.append((at, len(text), False))
    for start, end, plain in pieces:
        if start == end:
            continue
        encoded = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                            split_special_tokens=plain)
        ids += list(encoded["input_ids"])
        offsets += [(start + a, start + b) for a, b in encoded["offset_mapping"]]
    return ids, offsets


def encode_prompt(messages: Sequence[dict], tokenizer) -> List[int]:
    """The token ids of a conversation rendered for the next answer (the generation prompt added)."""
    messages = fit_to_template(messages, tokenizer)[0]
    text = render(messages, tokenizer, add_generation_prompt=True)
    return encode_text(text, tokenizer, literal_ranges(messages, tokenizer, text, True))[0]


def tokenize_conversation(
    messages: Sequence[dict], tokenizer, train_on_prompt: bool = False
) -> Tuple[List[int], List[int]]:
    """Token ids and labels for one conversation: labels are IGNORE_INDEX outside assistant turns.

    A token is trained when it overlaps an assistant span (its content and end-of-turn token). A
    control string typed inside a message is trained as the text it is.
    """
    return tokenize_with_offsets(messages, tokenizer, train_on_prompt)[:2]


def tokenize_with_offsets(messages: Sequence[dict], tokenizer, train_on_prompt: bool = False):
    """(ids, labels, each token's character offsets, the rendered text, the assistant spans in it): what
    tokenize_conversation returns, with where each token and each answer lies in the text."""
    messages = fit_to_template(messages, tokenizer)[0]
    text, spans = assistant_char_spans(messages, tokenizer)
    input_ids, offsets = encode_text(text, tokenizer, literal_ranges(messages, tokenizer, text))
    if train_on_prompt:
        return input_ids, list(input_ids), offsets, text, spans
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if start < span_end and end > span_start:
            labels[position] = input_ids[position]
    return input_ids, labels, offsets, text, spans


def trained_text(input_ids: Sequence[int], labels: Sequence[int], tokenizer) -> List[str]:
    """Decode the trained runs of tokens, one string per contiguous run (for checks and tests)."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
        else:
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def stop_token_ids(tokenizer) -> List[int]:
    """Token ids that end an assistant turn in generation: EOS and the template's end-of-turn token."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        text, spans = assistant_char_spans(probe, tokenizer)
    except ChatkitError:  # a template that cannot render the probe: EOS alone
        return ids
    tail = text[spans[-1][0] + 1 : spans[-1][1]]
    for special in _special_strings(tokenizer):
        if tail.endswith(special):
            token_id = tokenizer.convert_tokens_to_ids(special)
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
            break
    return ids


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the pad token (id 0 included), else the first end-of-turn token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop_token_ids(tokenizer)[0]


def split_exchanges(messages: Sequence[dict]) -> Tuple[Optional[dict], List[List[dict]]]:
    """The system message (if any) and the exchanges: each a user turn and every turn up to the next one."""
    system = messages[0] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system else messages
    exchanges: List[List[dict]] = []
    for message in turns:
        if message["role"] == "user" or not exchanges:
            exchanges.append([])
        exchanges[-1].append(message)
    return system, exchanges


def count_exchanges(messages: Sequence[dict]) -> int:
    """Exchanges that the model can learn from: a user turn answered by the assistant."""
    return sum(1 for exchange in split_exchanges(messages)[1]
               if exchange[0]["role"] == "user" and any(m["role"] == "assistant" for m in exchange))


def with_system_prompt(messages: Sequence[dict], system_prompt: Optional[str]) -> List[dict]:
    """Prepend a system message, unless the conversation already starts with one."""
    messages = list(messages)
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
