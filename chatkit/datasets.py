"""Reading chat training data (messages, ShareGPT, prompt/response, user/bot), checking and splitting it."""

from __future__ import annotations

import json
import random
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import ChatkitError
from .formatting import MAX_MESSAGE_CHARS, ROLES

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


@dataclass
class DataReport:
    """What was read: conversations by input format, and skips by reason."""

    formats: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        read = ", ".join(f"{count} in the {kind} format" for kind, count in sorted(self.formats.items())) or "nothing"
        text = f"read {sum(self.formats.values())} conversations ({read})"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{count} {why}" for why, count in sorted(self.skipped.items()))
        return text


def read_text_file(path: str, flag: str, what: str) -> str:
    """A UTF-8 text file's contents; a missing, undecodable or empty file is a ChatkitError naming `flag`."""
    file = Path(path)
    if file.is_dir():
        raise ChatkitError(f"{flag} {path} is a folder; name a file in it (or, for an export, the folder that holds "
                           "conversations.json)")
    if not file.is_file():
        raise ChatkitError(f"{flag} {path}: no such file")
    raw = file.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ChatkitError(f"{path} is UTF-16 text (as Windows Notepad saves 'Unicode'); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChatkitError(f"{path}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise ChatkitError(f"{path}: the file is empty; it should hold {what}")
    return text


CONVERT_FIRST = ("is a ChatGPT export, not training data; convert it first: python convert_chatgpt_export.py "
                 "{path} my-conversations.jsonl, then --data my-conversations.jsonl")


def load_records(path: str) -> List[object]:
    """A JSON array (or {"data"/"conversations": [...]}) or JSON Lines file, as a list of records."""
    if Path(path).is_file() and zipfile.is_zipfile(path):
        raise ChatkitError(f"{path} " + CONVERT_FIRST.format(path=path))
    text = read_text_file(path, "--data", "conversations in the messages format")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ChatkitError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        return data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == 1 and stripped.startswith("{"):
                try:  # one JSON object spread over several lines
                    data = json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    for key in ("data", "conversations", "examples"):
                        if isinstance(data.get(key), list):
                            return data[key]
                    return [data]
            raise ChatkitError(f"{path}: line {number} is not valid JSON ({exc.msg}); expected JSON Lines") from None
    return records


def normalise_record(record, where: str) -> Tuple[str, List[dict]]:
    """(format name, messages) for one record in any accepted format; raises ChatkitError when unusable."""
    if not isinstance(record, dict):
        raise ChatkitError(f"{where}: expected an object like {{\"messages\": [...]}}, got {type(record).__name__}")
    if "mapping" in record and "messages" not in record:
        raise ChatkitError(f"{where.rsplit(' record ', 1)[0]} " + CONVERT_FIRST.format(path=where.rsplit(" record ", 1)[0]))
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ChatkitError(f"{where}: 'messages' must be a list")
        out = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ChatkitError(f"{where}, message {index}: needs 'role' and 'content'")
            if message["role"] not in ROLES:
                raise ChatkitError(f"{where}, message {index}: role {message['role']!r} is not one of "
                                   f"{', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise ChatkitError(f"{where}, message {index}: 'content' must be a string")
            out.append({"role": message["role"], "content": message["content"]})
        return "messages", out
    if "conversations" in record and isinstance(record["conversations"], list):
        out = []
        for index, turn in enumerate(record["conversations"]):
            speaker = str(turn.get("from", "")).lower() if isinstance(turn, dict) else ""
            if speaker not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
                raise ChatkitError(f"{where}, turn {index}: ShareGPT turns need 'from' (human/gpt/system) and 'value'")
            out.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
        return "ShareGPT", out
    for prompt_key, answer_key, name in (("prompt", "response", "prompt/response"),
                                         ("prompt", "completion", "prompt/completion"),
                                         ("instruction", "output", "instruction/output"),
                                         ("user", "bot", "user/bot")):
        if prompt_key in record and answer_key in record:
            prompt, answer = record[prompt_key], record[answer_key]
            if not isinstance(prompt, str) or not isinstance(answer, str):
                raise ChatkitError(f"{where}: '{prompt_key}' and '{answer_key}' must be strings")
            if name == "instruction/output" and isinstance(record.get("input"), str) and record["input"]:
                prompt = f"{prompt}\n\n{record['input']}"
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            if isinstance(record.get("system"), str) and record["system"]:
                messages.insert(0, {"role": "system", "content": record["system"]})
            return name, messages
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise ChatkitError(
        f"{where}: unknown record format (keys: {keys}); use {{\"messages\": [{{\"role\": \"user\", "
        "\"content\": ...}, {\"role\": \"assistant\", \"content\": ...}]}"
    )


def order_problem(messages: Sequence[dict]) -> Optional[str]:
    """Why a conversation cannot be trained on as it stands, or None."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "without an assistant turn"
    if "system" in roles[1:]:
        return "with a system message after the first turn"
    turns = roles[1:] if roles[0] == "system" else roles
    if turns and turns[0] != "user":
        return "starting with an assistant turn"
    if any(a == b for a, b in zip(turns, turns[1:])):
        return "with roles out of order (two turns of the same role in a row)"
    return None


def read_conversations(paths: Sequence[str], converted: Sequence[Tuple[str, List[dict]]] = ()
                       ) -> Tuple[List[List[dict]], DataReport]:
    """All conversations of all files (and of `converted`: (label, records) of exports converted in memory);
    unusable records are errors, untrainable ones counted skips."""
    report = DataReport()
    conversations: List[List[dict]] = []
    for label, records in converted:
        add_records(records, label, report, conversations)
    for path in paths:
        records = load_records(path)
        if not isinstance(records, list):
            raise ChatkitError(f"{path}: expected a JSON array of conversations")
        add_records(records, path, report, conversations)
    if not conversations:
        raise ChatkitError(
            f"{', '.join(paths)}: no usable conversations ({report.describe()}); each needs a user turn "
            "followed by an assistant turn"
        )
    return conversations, report


def add_records(records: Sequence, label: str, report: DataReport, conversations: List[List[dict]]) -> None:
    for index, record in enumerate(records):
        kind, messages = normalise_record(record, f"{label} record {index}")
        messages = [m for m in messages if m["content"].strip() or m["role"] == "assistant"]
        problem = order_problem(messages) if messages else "empty"
        if any(len(m["content"]) > MAX_MESSAGE_CHARS for m in messages):
            problem = f"with a message over {MAX_MESSAGE_CHARS:,} characters"
        if problem:
            report.skipped[f"conversations {problem}"] += 1
            continue
        report.formats[kind] += 1
        conversations.append(messages)


def default_val_split(count: int) -> float:
    """10% for validation when there are at least 10 conversations; below that every one is needed."""
    return 0.1 if count >= 10 else 0.0


def split_train_val(items: Sequence, val_split: float, seed: int) -> Tuple[list, list]:
    items = list(items)
    if val_split <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(items) * val_split))
    val = sorted(order[:count])
    train = sorted(order[count:])
    return [items[i] for i in train], [items[i] for i in val]
