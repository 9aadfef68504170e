"""Reading ChatGPT's "Export data" archives: finding the files, streaming conversations, walking trees.

Conversations are parsed one at a time with `json.JSONDecoder.raw_decode` over a sliding text buffer
(C-speed parsing, memory bounded by the buffer and the largest single conversation), straight from
the zip member or file, so exports of several GB convert without loading them whole.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import ChatkitError

CONVERSATION_FILE = re.compile(r"(^|/)conversations(-\d+)?\.json$")
CHUNK_CHARS = 4 * 1024 * 1024  # text decoded per read; bounds memory together with the largest conversation
# Limits that keep a damaged or hostile file from taking the machine: a real conversation is at most a few
# MB of JSON (images are separate files), and the thumbs file a few MB for years of use.
MAX_CONVERSATION_CHARS = 64 * 1024 * 1024
MAX_FEEDBACK_BYTES = 64 * 1024 * 1024

_replaced_bytes = [0]


def _count_replacement(error: UnicodeDecodeError):
    _replaced_bytes[0] += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("chatkit-count", _count_replacement)


@dataclass
class Source:
    """One conversations file: where it is, how to open it, and its size in bytes."""

    label: str
    open: Callable[[], IO[bytes]]
    size: int
    file: str = ""  # the file on disk that holds it (the zip, or the JSON file itself)


@dataclass
class ReadStats:
    files: int = 0
    bytes_total: int = 0
    bytes_read: int = 0
    replaced_bytes: int = 0
    unsafe_members: List[str] = field(default_factory=list)


def _zip_sources(path: Path, stats: ReadStats) -> List[Source]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ChatkitError(f"{path}: not a readable zip file ({exc}); download the export again") from None
    sources = []
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        if not CONVERSATION_FILE.search(name) or info.is_dir():
            continue
        if name.startswith("/") or ".." in name.split("/"):
            stats.unsafe_members.append(f"{path}:{info.filename}")
            continue
        sources.append(Source(f"{path}:{name}", lambda info=info: archive.open(info), info.file_size, str(path)))
    if not sources:
        raise ChatkitError(
            f"{path}: the zip holds no conversations.json or conversations-NNN.json; "
            "is this the archive from ChatGPT's Settings > Data controls > Export data?"
        )
    return sources


def _natural_key(label: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def looks_like_export(path: str) -> bool:
    """Whether `path` is a ChatGPT export (its zip, its folder, or a conversations file with conversation
    trees) rather than training data: the trainer converts such an input first."""
    file = Path(path)
    if file.is_dir():
        return any(file.glob("conversations*.json"))
    if not file.is_file():
        return False
    if zipfile.is_zipfile(file):
        return True
    with open(file, "rb") as handle:
        head = handle.read(1 << 16).decode("utf-8", "ignore")
    tree, records = re.search(r'"mapping"\s*:', head), re.search(r'"messages"\s*:', head)
    return bool(tree) and (not records or tree.start() < records.start())


FEEDBACK_FILE = "message_feedback.json"


def read_feedback(inputs: Sequence[str]) -> Dict[str, str]:
    """The thumbs the user gave, by message id ("up" or "down"), from each input's message_feedback.json
    (in the zip, in the folder, or beside the conversations file).

    Exports spell it two ways: `"rating": "thumbsUp"` / `"thumbsDown"` and `"thumbs_up"` / `"thumbs_down"`,
    the rated message as `message_id` (older files: `id` when no `message_id` is given)."""
    ratings: Dict[str, str] = {}
    for raw in inputs:
        for records in _feedback_files(Path(raw)):
            for record in records if isinstance(records, list) else []:
                if not isinstance(record, dict):
                    continue
                target = record.get("message_id") or record.get("id")
                rating = re.sub(r"[^a-z]", "", str(record.get("rating", record.get("feedback", ""))).lower())
                thumb = {"thumbsup": "up", "up": "up", "positive": "up", "thumbsdown": "down", "down": "down",
                         "negative": "down"}.get(rating)
                if isinstance(target, str) and thumb:
                    ratings[target] = thumb
    return ratings


def _feedback_files(path: Path):
    try:
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if info.filename.replace("\\", "/").split("/")[-1] == FEEDBACK_FILE:
                        _check_feedback_size(f"{path}:{info.filename}", info.file_size)
                        yield json.loads(archive.read(info).decode("utf-8-sig"))
            return
        folder = path if path.is_dir() else path.parent
        for file in ([folder / FEEDBACK_FILE] if not path.is_dir() else sorted(folder.rglob(FEEDBACK_FILE))):
            if file.is_file():
                _check_feedback_size(str(file), file.stat().st_size)
                yield json.loads(file.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, zlib.error) as exc:
        raise ChatkitError(f"{path}: its {FEEDBACK_FILE} cannot be read ({exc}); leave out --preferences, or "
                           "download the export again") from None


def _check_feedback_size(label: str, size: int) -> None:
    if size > MAX_FEEDBACK_BYTES:
        raise ChatkitError(f"{label}: {size / 1e6:,.0f} MB, far more than thumbs up and down take (a few MB for "
                           "years of use); the file is damaged: leave out --preferences, or download the export "
                           "again")


def find_sources(inputs: Sequence[str], stats: ReadStats) -> List[Source]:
    """Every conversations file in the inputs: zips, extracted folders, or JSON files."""
    sources: List[Source] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise ChatkitError(f"{raw}: no such file or directory")
        if path.is_dir():
            found = [p for p in path.rglob("*.json") if CONVERSATION_FILE.search(p.relative_to(path).as_posix())]
            if not found:
                raise ChatkitError(
                    f"{raw}: the folder holds no conversations.json or conversations-NNN.json; "
                    "pass the folder you extracted the export into, or the zip itself"
                )
            found.sort(key=lambda p: _natural_key(str(p)))
            sources += [Source(str(p), lambda p=p: open(p, "rb"), p.stat().st_size, str(p)) for p in found]
        elif zipfile.is_zipfile(path):
            sources += sorted(_zip_sources(path, stats), key=lambda s: _natural_key(s.label))
        else:
            with open(path, "rb") as handle:
                head = handle.read(64)
            if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise ChatkitError(f"{raw} is UTF-16 text (as Windows Notepad saves 'Unicode'), not the export as "
                                   "ChatGPT wrote it; save it as UTF-8, or pass the zip ChatGPT mailed")
            head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
            if not head.startswith((b"[", b"{")):
                raise ChatkitError(
                    f"{raw}: not a ChatGPT export (expected a .zip, an extracted folder, or a conversations .json file)"
                )
            sources.append(Source(str(path), lambda p=path: open(p, "rb"), path.stat().st_size, str(path)))
    stats.files = len(sources)
    stats.bytes_total = sum(s.size for s in sources)
    return sources


class _TextStream:
    """Decodes a byte stream to text in chunks, counting invalid UTF-8 bytes instead of failing."""

    def __init__(self, handle: IO[bytes], on_bytes: Callable[[int], None], label: str = ""):
        self.handle = handle
        self.label = label
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="chatkit-count")
        self.on_bytes = on_bytes
        self.eof = False

    def read(self) -> str:
        try:
            data = self.handle.read(CHUNK_CHARS)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise ChatkitError(f"{self.label}: the data is damaged ({type(exc).__name__}: {exc}); nothing was "
                               "written: download the export again") from None
        self.on_bytes(len(data))
        if not data:
            self.eof = True
            return self.decoder.decode(b"", final=True)
        return self.decoder.decode(data)


_WS = re.compile(r"[\s,]*")
_WRAPPER = re.compile(r'\{\s*"conversations"\s*:\s*\[')


def _array_start(source: Source, stream: "_TextStream", buffer: str, decoder) -> Tuple[str, Optional[int], object]:
    """(buffer, where the first conversation of the array starts, None) or, for a file holding one
    conversation object, (buffer, None, that conversation)."""
    while not stream.eof and len(buffer.lstrip()) < 64:
        buffer += stream.read()
    stripped = buffer.lstrip()
    if stripped.startswith("["):
        return buffer, len(buffer) - len(stripped) + 1, None
    if _WRAPPER.match(stripped):
        return buffer, len(buffer) - len(stripped) + _WRAPPER.match(stripped).end(), None
    if not stripped.startswith("{"):
        raise ChatkitError(f"{source.label}: not JSON (it should start with '[' or '{{')")
    while not stream.eof:  # one conversation object: parse it whole
        buffer += stream.read()
    try:
        value, _ = decoder.raw_decode(buffer, len(buffer) - len(stripped))
    except json.JSONDecodeError as exc:
        raise ChatkitError(f"{source.label}: invalid JSON ({exc}); download the export again") from None
    return buffer, None, value


def iter_json_values(source: Source, on_bytes: Callable[[int], None]) -> Iterator[Tuple[int, object]]:
    """Yield (index, conversation) from one file: a JSON array, one object, or {"conversations": [...]}."""
    decoder = json.JSONDecoder()
    with source.open() as handle:
        stream = _TextStream(handle, on_bytes, source.label)
        buffer, pos, single = _array_start(source, stream, stream.read(), decoder)
        if pos is None:
            yield 0, single
            return
        index = 0
        consumed_chars = 0
        while True:
            pos = _WS.match(buffer, pos).end()
            if pos >= len(buffer):
                if stream.eof:
                    raise ChatkitError(
                        f"{source.label}: the file ends after conversation {index} without closing ']'; "
                        "it is truncated: download the export again"
                    )
                consumed_chars += pos
                buffer, pos = stream.read(), 0
                continue
            if buffer[pos] in "]}":
                return
            try:
                value, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as exc:
                if stream.eof:
                    where = "the file ends inside" if exc.pos >= len(buffer) - 1 or "Unterminated" in exc.msg else "invalid JSON in"
                    raise ChatkitError(
                        f"{source.label}: {where} conversation {index} (character {consumed_chars + exc.pos}: "
                        f"{exc.msg}); the export is damaged or truncated: download it again"
                    ) from None
                if len(buffer) - pos > MAX_CONVERSATION_CHARS:
                    raise ChatkitError(
                        f"{source.label}: conversation {index} (from character {consumed_chars + pos}) is over "
                        f"{MAX_CONVERSATION_CHARS >> 20} MB of JSON, far more than a ChatGPT conversation holds; the "
                        "file is damaged or not an export: download it again"
                    ) from None
                consumed_chars += pos
                buffer = buffer[pos:] + stream.read()
                pos = 0
                continue
            yield index, value
            index += 1
            pos = end


def iter_conversations(
    sources: Sequence[Source], stats: ReadStats, progress: bool = True
) -> Iterator[Tuple[str, int, object]]:
    """Yield (file label, index in file, conversation) across every source, reporting progress."""
    started = last = time.monotonic()

    def on_bytes(count: int) -> None:
        nonlocal last
        stats.bytes_read += count
        now = time.monotonic()
        if progress and now - last > 2 and now - started > 2:
            last = now
            share = stats.bytes_read / stats.bytes_total * 100 if stats.bytes_total else 100
            print(f"  read {stats.bytes_read / 1e6:,.0f} of {stats.bytes_total / 1e6:,.0f} MB ({share:.0f}%)",
                  file=sys.stderr)

    _replaced_bytes[0] = 0
    for source in sources:
        for index, conversation in iter_json_values(source, on_bytes):
            yield source.label, index, conversation
    stats.replaced_bytes = _replaced_bytes[0]


# ---------------------------------------------------------------------------------------------
# The tree of one conversation


class SkipConversation(Exception):
    """A conversation that cannot be converted; the message is the counted reason."""


def node_parent(mapping: dict, node_id: str) -> Optional[str]:
    node = mapping.get(node_id)
    parent = node.get("parent") if isinstance(node, dict) else None
    return parent if parent in mapping else None


def current_path(conversation: dict) -> List[dict]:
    """Nodes from the root to `current_node`: the conversation as the user last saw it."""
    mapping = conversation.get("mapping")
    if not isinstance(mapping, dict) or not mapping:
        raise SkipConversation("no mapping")
    node_id = conversation.get("current_node")
    if node_id not in mapping:
        raise SkipConversation("current_node not in mapping")
    path, seen = [], set()
    while node_id is not None:
        if node_id in seen:
            raise SkipConversation("cycle in parent links")
        seen.add(node_id)
        path.append(mapping[node_id])
        node_id = node_parent(mapping, node_id)
    path.reverse()
    return path


def all_paths(conversation: dict, limit: int) -> Tuple[List[List[dict]], int]:
    """Root-to-leaf paths of the tree, the current one first, at most `limit`; and how many were left out.

    Children are followed once each (a node that lists the same child twice gives one path), and the
    walk stops counting paths past the limit, so a damaged tree cannot blow up.
    """
    mapping = conversation.get("mapping")
    if not isinstance(mapping, dict) or not mapping:
        raise SkipConversation("no mapping")
    paths: List[List[dict]] = []
    try:
        paths.append(current_path(conversation))
    except SkipConversation as exc:
        if str(exc) == "cycle in parent links":
            raise
    left_out = 0
    for root in (key for key in mapping if node_parent(mapping, key) is None):
        # One path list shared by the whole walk (cut back on each pop), so a chain of n nodes costs n steps.
        stack, path, ids, on_path = [(root, 0)], [], [], set()
        while stack:
            node_id, depth = stack.pop()
            for gone in ids[depth:]:
                on_path.discard(gone)
            del path[depth:], ids[depth:]
            if node_id in on_path:
                raise SkipConversation("cycle in parent links")
            path.append(mapping[node_id])
            ids.append(node_id)
            on_path.add(node_id)
            children = list(dict.fromkeys(c for c in (mapping[node_id].get("children") or [])
                                          if isinstance(c, str) and c in mapping))
            if children:
                stack += [(child, depth + 1) for child in reversed(children)]
            elif len(paths) < limit:
                paths.append(list(path))
            else:
                left_out += 1
                if left_out >= limit:  # enough to say the tree was cut; stop walking it
                    return paths, left_out
    return paths, left_out
