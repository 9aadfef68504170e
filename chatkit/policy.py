"""The message policy of the converter: which messages of a ChatGPT conversation become training turns
(text parts, tool output, cut answers, custom instructions), how turns are merged, and which
conversations are filtered out (dates, titles, models)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import List, Optional, Sequence, Tuple

from . import export
from .errors import ChatkitError
from .formatting import MAX_MESSAGE_CHARS
from .options import ConvertOptions

TOOL_BLOCK = "```{label}\n{text}\n```"


TRAINING_RECORD = "training record, not a ChatGPT conversation"


MAX_BRANCHES = 64  # records per conversation with --all-branches; a tree with more is cut, and counted


@dataclass
class Stats:
    read: int = 0
    kept: int = 0
    records: int = 0
    messages: int = 0
    characters: int = 0
    branches: int = 0  # conversations whose tree has more than one root-to-leaf path
    dropped: Counter = field(default_factory=Counter)
    skipped_content: Counter = field(default_factory=Counter)
    truncated: int = 0
    replaced_characters: int = 0  # lone surrogates, written as U+FFFD
    branches_cut: int = 0  # conversations with more than MAX_BRANCHES paths
    redactions: Counter = field(default_factory=Counter)
    warnings: List[str] = field(default_factory=list)
    custom_instructions: set = field(default_factory=set)  # the distinct custom instructions used as system messages
    pairs: Counter = field(default_factory=Counter)  # --preferences: pairs written, by source
    labelled: int = 0  # --preferences: rated answers without a sibling, written as labelled examples


def parse_date(value: str, end_of_day: bool = False) -> float:
    """Epoch seconds for YYYY-MM-DD or an ISO datetime (UTC unless it says otherwise)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ChatkitError(f"date {value!r} is not YYYY-MM-DD or an ISO date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if end_of_day and len(value) == 10:
        moment += timedelta(days=1)
    return moment.timestamp()


def _text_of_parts(parts, options: ConvertOptions, stats: Stats) -> str:
    if isinstance(parts, str):  # some exports hold the text itself, not a list of parts
        parts = [parts]
    elif not isinstance(parts, list):
        parts = []
    pieces = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict):
            kind = part.get("content_type") or "unknown_part"
            if kind == "audio_transcription" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif options.image_placeholder is not None and "image" in kind:
                pieces.append(options.image_placeholder)
            else:
                stats.skipped_content[kind] += 1
    return "\n".join(p for p in pieces if p)


def _tool_text(message: dict) -> str:
    content = message.get("content") or {}
    for key in ("text", "result"):
        if isinstance(content.get(key), str):
            return content[key]
    if isinstance(content.get("parts"), list):
        return "\n".join(p for p in content["parts"] if isinstance(p, str))
    return ""


def was_cut(message: dict) -> bool:
    """ChatGPT stopped this answer at its length limit; "Continue generating" carries on in the next message."""
    details = (message.get("metadata") or {}).get("finish_details") or {}
    return isinstance(details, dict) and details.get("type") == "max_tokens"


def message_turn(node: dict, options: ConvertOptions, stats: Stats) -> Optional[Tuple[str, str, bool]]:
    """(role, text, cut at the length limit) for one tree node, or None when the user did not see it as a turn."""
    turn = _role_and_text(node, options, stats)
    if turn is None:
        return None
    return turn[0], turn[1], turn[0] == "assistant" and was_cut(node["message"])


def _role_and_text(node: dict, options: ConvertOptions, stats: Stats) -> Optional[Tuple[str, str]]:
    message = node.get("message") if isinstance(node, dict) else None
    if not isinstance(message, dict):
        return None
    role = (message.get("author") or {}).get("role")
    content = message.get("content") or {}
    kind = content.get("content_type", "missing")
    metadata = message.get("metadata") or {}
    if metadata.get("is_visually_hidden_from_conversation") or message.get("weight") == 0:
        return None
    if role == "system":
        return None
    if message.get("channel") == "analysis":  # hidden reasoning
        stats.skipped_content["analysis"] += 1
        return None
    tool_call = role == "assistant" and message.get("recipient") not in (None, "all")
    if role == "tool" or tool_call:
        if not options.include_tools:
            stats.skipped_content["tool call" if tool_call else f"tool result ({kind})"] += 1
            return None
        if tool_call:
            label = content.get("language") if kind == "code" else None
            label = label or message.get("recipient") or "tool"
        else:
            label = f"{(message.get('author') or {}).get('name') or 'tool'} output"
        text = _checked_length(_tool_text(message))
        return ("assistant", TOOL_BLOCK.format(label=label, text=text)) if text else None
    if role not in ("user", "assistant"):
        stats.skipped_content[f"role:{role}"] += 1
        return None
    if kind in ("text", "multimodal_text"):
        return role, _checked_length(_text_of_parts(content.get("parts"), options, stats))
    stats.skipped_content[kind] += 1
    return None


def _checked_length(text: str) -> str:
    """A message's text, unless it is longer than any model could read: then the conversation is left out
    (training on its other turns would answer a question it never saw)."""
    if len(text) > MAX_MESSAGE_CHARS:
        raise export.SkipConversation(f"a message over {MAX_MESSAGE_CHARS:,} characters")
    return text


def custom_instructions(conversation: dict) -> Optional[str]:
    """The user's custom instructions as stored in the conversation, if any."""
    for node in (conversation.get("mapping") or {}).values():
        message = (node or {}).get("message") if isinstance(node, dict) else None
        if not isinstance(message, dict):
            continue
        content = message.get("content") or {}
        data = (message.get("metadata") or {}).get("user_context_message_data") or {}
        if content.get("content_type") == "user_editable_context":
            profile, instructions = content.get("user_profile"), content.get("user_instructions")
        elif data:
            profile, instructions = data.get("about_user_message"), data.get("about_model_message")
        else:
            continue
        parts = [p.strip() for p in (profile, instructions) if isinstance(p, str) and p.strip()]
        if parts:
            return "\n\n".join(parts)
    return None


def normalise_turns(turns: Sequence[Tuple[str, str, bool]]) -> List[dict]:
    """Drop empty turns, join adjacent same-role turns, trim a leading assistant and a trailing user.

    An answer cut at ChatGPT's length limit and its continuation are joined exactly as they are (the
    continuation often starts mid-word or mid-line); other same-role neighbours get a blank line.
    """
    messages: List[dict] = []
    previous_cut = False
    for role, text, cut in turns:
        if not text or not text.strip():
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += ("" if previous_cut else "\n\n") + text
        else:
            messages.append({"role": role, "content": text})
        previous_cut = cut
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages


def conversation_model(conversation: dict) -> Optional[str]:
    if conversation.get("default_model_slug"):
        return conversation["default_model_slug"]
    for node in (conversation.get("mapping") or {}).values():
        message = node.get("message") if isinstance(node, dict) else None
        slug = ((message or {}).get("metadata") or {}).get("model_slug") if isinstance(message, dict) else None
        if slug:
            return slug
    return None


def _model_slugs(conversation: dict) -> set:
    slugs = {conversation.get("default_model_slug")}
    for node in (conversation.get("mapping") or {}).values():
        message = node.get("message") if isinstance(node, dict) else None
        if isinstance(message, dict):
            slugs.add((message.get("metadata") or {}).get("model_slug"))
    return {s.lower() for s in slugs if isinstance(s, str)}


def timestamp(value) -> Optional[float]:
    """An export's time as epoch seconds: a number, or a string holding one or an ISO date; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            try:
                moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                return None
            return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return None


def conversation_id(conversation: dict) -> Optional[str]:
    """The conversation's id as text (a number is one too); an id of another JSON type counts as none."""
    for name in ("id", "conversation_id"):
        value = conversation.get(name)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def filter_reason(conversation: dict, options: ConvertOptions, title_re, since: Optional[float],
                  until: Optional[float]) -> Optional[str]:
    """Why a conversation is excluded by the user's filters (`since`/`until` as epoch seconds), or None."""
    created = timestamp(conversation.get("create_time"))
    if since is not None and (created is None or created < since):
        return "before --since"
    if until is not None and (created is None or created >= until):
        return "after --until"
    title = conversation.get("title")
    if title_re is not None and not title_re.search(title if isinstance(title, str) else ""):
        return "title does not match --title"
    if options.chatgpt_model and options.chatgpt_model.lower() not in _model_slugs(conversation):
        return "model does not match --chatgpt-model"
    if options.exclude_archived and conversation.get("is_archived"):
        return "archived"
    return None
