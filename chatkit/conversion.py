"""Turning ChatGPT conversations into `{"messages": [...]}` training records: policy, filters, output."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from . import export
from .errors import ChatkitError
from .files import atomic_output, check_outputs
from .formatting import MAX_MESSAGE_CHARS, clean_text, count_exchanges, split_exchanges
from .options import ConvertOptions
from .redact import Redactor

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


# ---------------------------------------------------------------------------------------------
# One message


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


# ---------------------------------------------------------------------------------------------
# One conversation


def _conversation_model(conversation: dict) -> Optional[str]:
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


class Converter:
    """Converts conversations one at a time, keeping statistics."""

    def __init__(self, options: ConvertOptions):
        self.options = options
        self.stats = Stats()
        self.title_re = None
        self.since = parse_date(options.since) if options.since else None
        self.until = parse_date(options.until, end_of_day=True) if options.until else None
        if options.title:
            try:
                self.title_re = re.compile(options.title, re.IGNORECASE)
            except re.error as exc:
                raise ChatkitError(f"--title {options.title!r} is not a valid regular expression ({exc})") from None
        self.redactor = Redactor() if options.redact else None
        self.count_tokens = self._token_counter() if options.max_conversation_tokens else None

    def _token_counter(self) -> Callable[[List[dict]], int]:
        if not self.options.tokenizer:
            raise ChatkitError("--max-conversation-tokens needs --tokenizer MODEL (the model you will train, e.g. smollm2-135m)")
        from .formatting import render
        from .models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(self.options.tokenizer))

        def count(messages: List[dict]) -> int:
            return len(tokenizer(render(messages, tokenizer), add_special_tokens=False)["input_ids"])

        return count

    def convert(self, conversation) -> List[dict]:
        """Records for one conversation (several with --all-branches); drops are counted in stats."""
        stats, options = self.stats, self.options
        stats.read += 1
        if not isinstance(conversation, dict):
            stats.dropped["not a conversation object"] += 1
            return []
        if "messages" in conversation and "mapping" not in conversation:
            stats.dropped[TRAINING_RECORD] += 1
            return []
        reason = filter_reason(conversation, options, self.title_re, self.since, self.until)
        if reason:
            stats.dropped[reason] += 1
            return []
        try:
            paths, left_out = export.all_paths(conversation, MAX_BRANCHES) if options.all_branches else (
                [export.current_path(conversation)], 0)
        except export.SkipConversation as exc:
            stats.dropped[str(exc)] += 1
            return []
        if left_out:
            stats.branches_cut += 1
        mapping = conversation["mapping"]
        if any(isinstance(n, dict) and len(n.get("children") or []) > 1 for n in mapping.values()):
            stats.branches += 1
        records = []
        for path in paths:
            try:
                messages = self._messages(conversation, path)
            except export.SkipConversation as exc:
                stats.dropped[str(exc)] += 1
                return []
            if messages is None:
                continue
            if any(_is_prefix(messages, other["messages"]) for other in records):
                continue
            records = [r for r in records if not _is_prefix(r["messages"], messages)]
            records.append(self._record(conversation, messages))
        if not records:
            return []
        stats.kept += 1
        return records

    def _messages(self, conversation: dict, path: List[dict]) -> Optional[List[dict]]:
        stats, options = self.stats, self.options
        turns = [turn for turn in (message_turn(node, options, stats) for node in path) if turn]
        messages = normalise_turns(turns)
        if count_exchanges(messages) < max(options.min_exchanges, 1):
            reason = "no exchange" if count_exchanges(messages) == 0 else "fewer than --min-exchanges"
            stats.dropped[reason] += 1
            return None
        if self.redactor:
            for message in messages:
                message["content"] = self.redactor(message["content"])
        system = self.system_for(conversation)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return self._limit_length(messages)

    def system_for(self, conversation: dict) -> Optional[str]:
        """The system message a conversation's records start with: its custom instructions or --system-prompt
        (redacted with --redact: "about you" holds personal data)."""
        system = self.options.system_prompt
        found = custom_instructions(conversation) if self.options.custom_instructions else None
        if found:
            self.stats.custom_instructions.add(found)
            system = found
        return self.redactor(system) if system and self.redactor else system

    def preferences(self, conversation: dict, ratings: Dict[str, str]) -> Tuple[List[dict], List[dict]]:
        """(pairs, labelled examples) of one conversation; none for one the filters leave out."""
        if not isinstance(conversation, dict) or not isinstance(conversation.get("mapping"), dict):
            return [], []
        if filter_reason(conversation, self.options, self.title_re, self.since, self.until):
            return [], []
        return PreferenceWalk(self, conversation, ratings).records()

    def _limit_length(self, messages: List[dict]) -> Optional[List[dict]]:
        options, stats = self.options, self.stats
        limits = []
        if options.max_chars:
            limits.append((options.max_chars, lambda ms: sum(len(m["content"]) for m in ms), "--max-chars"))
        if options.max_conversation_tokens:
            limits.append((options.max_conversation_tokens, self.count_tokens, "--max-conversation-tokens"))
        for limit, measure, flag in limits:
            if measure(messages) <= limit:
                continue
            if not options.truncate:
                stats.dropped[f"longer than {flag}"] += 1
                return None
            cut = _cut_at_exchange(messages, limit, measure)
            if cut is None or count_exchanges(cut) < max(options.min_exchanges, 1):
                stats.dropped[f"first exchange longer than {flag}"] += 1
                return None
            stats.truncated += 1
            messages = cut
        return messages

    def _clean(self, text):
        if not isinstance(text, str):
            return text
        text, replaced = clean_text(text)
        self.stats.replaced_characters += replaced
        return text

    def _record(self, conversation: dict, messages: List[dict]) -> dict:
        messages = [dict(message, content=self._clean(message["content"])) for message in messages]
        record = {"messages": messages}
        if self.options.metadata:
            title = conversation.get("title")
            if self.redactor and isinstance(title, str):
                title = self.redactor(title)
            record.update(
                id=self._clean(conversation_id(conversation)),
                title=self._clean(title) if isinstance(title, str) else None,
                create_time=timestamp(conversation.get("create_time")),
                model=_conversation_model(conversation),
            )
        return record


class Judged(NamedTuple):
    """One sibling answer and the user's signs about it."""

    node: str
    text: str
    rating: Optional[str]  # "up", "down" or None
    continued: bool  # the user went on from it


class PreferenceWalk:
    """Preference pairs from one conversation tree (the converter's other view of the same walk).

    - A regenerated answer: the user went on from one of the sibling answers (it is on the path to
      `current_node`, or a user turn follows it); that one is chosen, each sibling left without a
      follow-up is rejected.
    - Thumbs on sibling answers: a thumbed-up one is chosen, a thumbed-down one rejected (the full rule is
      `_pairs`'s).
    - A rated answer without a sibling: a labelled example (KTO's format: completion and label).
    Edits of the user's own message (sibling user turns) give nothing: they are not a judgement of an answer.
    """

    def __init__(self, converter: "Converter", conversation: dict, ratings: Dict[str, str]):
        self.converter, self.conversation, self.ratings = converter, conversation, ratings
        self.mapping = conversation["mapping"]
        node, self.on_path = conversation.get("current_node"), set()
        while node in self.mapping and node not in self.on_path:
            self.on_path.add(node)
            node = export._node_parent(self.mapping, node)

    def records(self) -> Tuple[List[dict], List[dict]]:
        pairs, labelled = [], []
        for parent_id, node in self.mapping.items():
            answers = [(c, self._answer(c)) for c in self._children(parent_id)]
            answers = [(c, text) for c, text in answers if text]
            if not answers:
                continue
            # The prompt (a walk to the root) only where an answer was rated or regenerated: on every turn of
            # a long linear conversation it would cost time quadratic in its length.
            rating = self._rating(answers[0][0]) if len(answers) == 1 else None
            if len(answers) == 1 and not rating:
                continue
            prompt = self._prompt(parent_id)
            if prompt is None:
                continue
            if len(answers) == 1:
                labelled.append({"prompt": prompt, "completion": [_assistant(answers[0][1])], "label": rating == "up"})
                continue
            pairs += self._pairs(prompt, answers)
        return pairs, labelled

    def _pairs(self, prompt: List[dict], answers: List[Tuple[str, str]]) -> List[dict]:
        """The preference rule, for sibling answers to one prompt (stated once here; tests/test_preferences.py
        checks it for every combination of thumbs and branches):

        - Thumbs are the user's own judgement and outrank the branch they went on from.
        - Chosen: a thumbed-up answer; else one the user went on from that is not thumbed down; else, when an
          answer is thumbed down, one without thumbs. Otherwise there is no sign, and no pair.
        - Rejected: each thumbed-down answer ("thumbs"); and, when the user went on from an answer they did
          not thumb down, each answer they left without thumbs ("regeneration").
        - Never rejected: a thumbed-up answer, one the user went on from (unless thumbed down), or a copy of
          the chosen text. Never chosen: a thumbed-down answer.
        """
        judged = [Judged(node, text, self._rating(node), node in self.on_path or self._followed(node))
                  for node, text in answers]
        went_on = any(a.continued and a.rating != "down" for a in judged)
        thumbed_down = any(a.rating == "down" for a in judged)
        candidates = ([a for a in judged if a.rating == "up"]
                      + [a for a in judged if a.continued and a.rating != "down"]
                      + [a for a in judged if a.rating is None and thumbed_down])
        if not candidates:
            return []
        chosen, out = candidates[0], []
        for answer in judged:
            if answer.node == chosen.node or answer.text == chosen.text:
                continue
            if answer.rating == "down":
                source = "thumbs"
            elif answer.rating is None and not answer.continued and went_on:
                source = "regeneration"
            else:
                continue
            out.append({"prompt": prompt, "chosen": [_assistant(chosen.text)], "rejected": [_assistant(answer.text)],
                        "source": source})
        return out

    def _children(self, node_id: str) -> List[str]:
        children = (self.mapping.get(node_id) or {}).get("children") or []
        return list(dict.fromkeys(c for c in children if isinstance(c, str) and c in self.mapping))

    def _turn(self, node_id: str):
        try:
            return message_turn(self.mapping[node_id], self.converter.options, Stats())
        except export.SkipConversation:  # a message too long to learn from: that branch gives no pair
            return None

    def _answer(self, node_id: str) -> Optional[str]:
        turn = self._turn(node_id)
        return self._clean(turn[1]) if turn and turn[0] == "assistant" and turn[1].strip() else None

    def _followed(self, node_id: str) -> bool:
        """Whether a user turn comes after this answer (the user went on from it)."""
        stack, seen = list(self._children(node_id)), set()
        while stack:
            child = stack.pop()
            if child in seen:
                continue
            seen.add(child)
            turn = self._turn(child)
            if turn and turn[0] == "user":
                return True
            stack += self._children(child)
        return False

    def _rating(self, node_id: str) -> Optional[str]:
        message = self.mapping[node_id].get("message") or {}
        return self.ratings.get(message.get("id") if isinstance(message, dict) else None) or self.ratings.get(node_id)

    def _prompt(self, parent_id: str) -> Optional[List[dict]]:
        """The conversation up to and including the user turn the answers reply to (None if it ends otherwise)."""
        path, node = [], parent_id
        while node is not None and node not in path:
            path.append(node)
            node = export._node_parent(self.mapping, node)
        turns = [t for t in (self._turn(n) for n in reversed(path)) if t]
        if not turns or turns[-1][0] != "user":
            return None
        messages = normalise_turns(turns + [("assistant", "-", False)])[:-1]
        if not messages or messages[-1]["role"] != "user":
            return None
        for message in messages:
            message["content"] = self._clean(message["content"])
        system = self.converter.system_for(self.conversation)
        return ([{"role": "system", "content": system}] if system else []) + messages

    def _clean(self, text: str) -> str:
        converter = self.converter
        text = converter.redactor(text) if converter.redactor else text
        return converter._clean(text)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _is_prefix(short: List[dict], long: List[dict]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short


def _cut_at_exchange(messages: List[dict], limit: int, measure) -> Optional[List[dict]]:
    """The longest leading run of whole exchanges (ending on an assistant turn) within the limit."""
    system, exchanges = split_exchanges(messages)
    kept, best = [system] if system else [], None
    for exchange in exchanges:
        kept = kept + exchange
        if measure(kept) > limit:
            break
        if kept[-1]["role"] == "assistant":
            best = kept
    return best


# ---------------------------------------------------------------------------------------------
# The whole run


def outputs_of(options: ConvertOptions, output: bool = True) -> Dict[str, str]:
    """Every file this conversion may write, by how the user named it."""
    named = {"OUTPUT": options.output} if output else {}
    if options.preferences:
        named["--preferences"] = options.preferences
        named["the rated answers' file beside --preferences"] = labelled_path(options.preferences)
    return named


def inputs_of(options: ConvertOptions, sources) -> List[str]:
    """Every file this conversion reads: the conversations' files and the thumbs beside them."""
    files = [source.file for source in sources]
    for raw in options.inputs:
        folder = Path(raw) if Path(raw).is_dir() else Path(raw).parent
        files.append(str(folder / export.FEEDBACK_FILE))
    return files


def stage(options: ConvertOptions, converter: Converter, staging, output: bool = True) -> set:
    """Convert every conversation into `staging` (one "copy-number TAB record" line per record).

    Returns the copy numbers to keep: of a conversation seen more than once, the newest copy."""
    stats = converter.stats
    read_stats = export.ReadStats()
    sources = export.find_sources(options.inputs, read_stats)
    check_outputs(outputs_of(options, output), inputs_of(options, sources), options.overwrite)
    stats.warnings += [f"skipped zip member with an unsafe path: {member}" for member in read_stats.unsafe_members]
    newest: Dict[str, Tuple[float, int]] = {}  # conversation id -> (update_time, copy number)
    ratings = export.read_feedback(options.inputs) if options.preferences else {}
    converter.preference_records = {}  # copy number -> (pairs, labelled examples)
    copy = 0
    for label, index, conversation in export.iter_conversations(sources, read_stats, not options.quiet):
        try:
            records = converter.convert(conversation)
        except (TypeError, AttributeError, KeyError, ValueError) as exc:
            stats.dropped["malformed conversation"] += 1
            stats.warnings.append(f"{label}, conversation {index}: malformed ({type(exc).__name__}: {exc}); skipped")
            continue
        if not records:
            continue
        copy += 1
        if options.preferences:
            converter.preference_records[copy] = converter.preferences(conversation, ratings)
        key = conversation_id(conversation) or f"#{copy}"
        updated = timestamp(conversation.get("update_time")) or timestamp(conversation.get("create_time")) or 0.0
        previous = newest.get(key)
        if previous is None or updated >= previous[0]:
            newest[key] = (updated, copy)
        for record in records:
            staging.write(f"{copy}\t{json.dumps(record, ensure_ascii=False)}\n")
    winners = {number for _, number in newest.values()}
    stats.dropped["duplicate (older copy)"] += copy - len(winners)
    stats.kept -= copy - len(winners)
    if read_stats.replaced_bytes:
        stats.warnings.append(f"{read_stats.replaced_bytes} bytes were not valid UTF-8 and became U+FFFD")
    if stats.replaced_characters:
        stats.warnings.append(f"{stats.replaced_characters} broken characters (lone UTF-16 surrogates) became U+FFFD")
    return winners


def write_records(staging, winners: set, out, options: ConvertOptions, stats: Stats) -> List[dict]:
    """The kept records from `staging` into `out` (JSON Lines or a JSON array); returns the preview ones."""
    preview: List[dict] = []
    first = True
    if not options.writes_jsonl:
        out.write("[\n")
    for line in staging:
        number, payload = line.rstrip("\n").split("\t", 1)
        if int(number) not in winners:
            continue
        record = json.loads(payload)
        stats.records += 1
        stats.messages += len(record["messages"])
        stats.characters += sum(len(m["content"]) for m in record["messages"])
        if len(preview) < options.preview:
            preview.append(record)
        if options.writes_jsonl:
            out.write(payload + "\n")
        else:
            out.write(("" if first else ",\n") + "  " + payload)
        first = False
    if not options.writes_jsonl:
        out.write("\n]\n")
    return preview


def run(options: ConvertOptions) -> Stats:
    """Convert every input into one output file, merging duplicates by newest update_time."""
    converter = Converter(options)
    with tempfile.TemporaryFile("w+", encoding="utf-8") as staging:
        winners = stage(options, converter, staging)
        if not winners:
            raise ChatkitError(nothing_kept(options, converter.stats))
        staging.seek(0)
        with atomic_output(options.output) as out:
            preview = write_records(staging, winners, out, options, converter.stats)
    if options.preferences:
        write_preferences(options, converter, winners)
    if converter.redactor:
        converter.stats.redactions = converter.redactor.counts
    for record in preview:
        print_preview(record)
    return converter.stats


def labelled_path(preferences: str) -> str:
    """Where rated answers without a sibling go, beside the pairs: OUT-labelled.jsonl."""
    root, _ = os.path.splitext(preferences)
    return root + "-labelled.jsonl"


def write_preferences(options: ConvertOptions, converter: Converter, winners: set) -> None:
    """The pairs (and labelled examples) of the kept copies, as JSON Lines; nothing when there are none."""
    stats = converter.stats
    pairs = [p for number in sorted(winners) for p in converter.preference_records.get(number, ([], []))[0]]
    labelled = [r for number in sorted(winners) for r in converter.preference_records.get(number, ([], []))[1]]
    stats.pairs = Counter(pair.pop("source") for pair in pairs)
    stats.labelled = len(labelled)
    if not pairs and not labelled:
        stats.warnings.append(f"--preferences: the export has no regenerated answer with a sign of which one was "
                              f"preferred and no thumbs up or down; nothing written to {options.preferences}")
        return
    for path, rows in ((options.preferences, pairs), (labelled_path(options.preferences), labelled)):
        if rows:
            with atomic_output(path) as out:
                out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def convert_in_memory(inputs: Sequence[str], redact: bool = False) -> Tuple[List[dict], Stats]:
    """The converter's default policy over exports, its records kept in memory: training straight from the
    zip ChatGPT mailed shares this one conversion with convert_chatgpt_export.py."""
    options = ConvertOptions(paths=[*inputs, ""], redact=redact, quiet=True)
    converter = Converter(options)
    records = []
    with tempfile.TemporaryFile("w+", encoding="utf-8") as staging:
        winners = stage(options, converter, staging, output=False)
        if not winners:
            raise ChatkitError(nothing_kept(options, converter.stats))
        staging.seek(0)
        for line in staging:
            number, payload = line.rstrip("\n").split("\t", 1)
            if int(number) in winners:
                records.append(json.loads(payload))
    stats = converter.stats
    stats.records = len(records)
    stats.messages = sum(len(record["messages"]) for record in records)
    if converter.redactor:
        stats.redactions = converter.redactor.counts
    return records, stats


def summary_line(stats: Stats) -> str:
    """The conversion in one line: what was kept and why the rest was left out."""
    dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(stats.dropped.items()) if count)
    text = f"converted {stats.kept} of {stats.read} conversations ({stats.messages} messages)"
    if stats.custom_instructions:
        text += f"; custom instructions as the system message ({len(stats.custom_instructions)} different)"
    text += f"; left out {dropped}" if dropped else ""
    if stats.redactions:
        text += f"; redacted {sum(stats.redactions.values())} ({', '.join(sorted(stats.redactions))})"
    return text


def nothing_kept(options: ConvertOptions, stats: Stats) -> str:
    """Why no record came out, with the fix; the output file is left as it was."""
    inputs = ", ".join(options.inputs)
    if stats.dropped.get(TRAINING_RECORD) == stats.read:
        return (f"{inputs} holds training data ({{\"messages\": ...}} records), not a ChatGPT export: it is "
                f"converted already; train on it with: python train_chatgpt_model.py --data {inputs}")
    reasons = ", ".join(f"{count} {why}" for why, count in stats.dropped.most_common()) or "none found"
    return (f"{inputs}: no conversation was kept (of {stats.read} read: {reasons}); {options.output} was not "
            "written. Loosen the filters (--min-exchanges, --since, --title, ...) or check the input")


def print_preview(record: dict, stream=None) -> None:
    stream = stream or sys.stderr
    title = record.get("title")
    print("=" * 60 + (f"\n{title}" if title else ""), file=stream)
    for message in record["messages"]:
        print(f"[{message['role']}]\n{message['content']}\n", file=stream)


def format_stats(stats: Stats, options: ConvertOptions) -> str:
    lines = [
        f"conversations read:    {stats.read}",
        f"conversations kept:    {stats.kept}" + (f" ({stats.records} records, all branches)" if options.all_branches else ""),
        f"messages written:      {stats.messages}",
        f"characters written:    {stats.characters}",
        f"conversations with branches: {stats.branches}",
    ]
    if stats.custom_instructions:
        lines.append(f"custom instructions used as the system message: {len(stats.custom_instructions)} different "
                     "(--no-custom-instructions leaves them out)")
    if stats.truncated:
        lines.append(f"truncated at an exchange: {stats.truncated}")
    if stats.branches_cut:
        lines.append(f"conversations with over {MAX_BRANCHES} branches, cut to the first {MAX_BRANCHES}: "
                     f"{stats.branches_cut}")
    if any(stats.dropped.values()):
        lines.append("dropped:")
        lines += [f"  {reason}: {count}" for reason, count in sorted(stats.dropped.items()) if count]
    if stats.skipped_content:
        lines.append("content skipped (by type):")
        lines += [f"  {kind}: {count}" for kind, count in sorted(stats.skipped_content.items())]
    if options.redact:
        total = sum(stats.redactions.values())
        lines.append(f"redacted: {total}" + "".join(f"\n  {k}: {v}" for k, v in sorted(stats.redactions.items())))
    if options.preferences and (stats.pairs or stats.labelled):
        lines.append(f"preference pairs:      {sum(stats.pairs.values())}"
                     + "".join(f"\n  from {source}: {count}" for source, count in sorted(stats.pairs.items()))
                     + (f"\nlabelled answers:      {stats.labelled} (in {labelled_path(options.preferences)})"
                        if stats.labelled else ""))
    lines += [f"warning: {w}" for w in stats.warnings]
    return "\n".join(lines)
