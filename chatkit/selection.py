"""What a time budget too short for the whole schedule trains first: the exchanges that hold what the base
model does not know of the user's world, several times over; whole conversations fill the rest.

Each exchange (a user turn and its answer) is read once by the base model, forward only, and the words of
the answer's opening that it finds far more surprising than the answer's typical word are noted: a name,
a project, a place it has never seen. A word that stands out like that in several of the user's
conversations is part of their world (a colleague, a product, the town they live in), and the
exchanges holding such words, the most of them per token first, are the budget's focus: each is trained
several times (a fact seen once is not learned), cut to the opening that was read. Surprise alone ranks a
language the model knows less, code and pasted logs first, and those are not what a person wants their
model to know (docs/PERFORMANCE.md, "Choosing what a budget trains").

The standout words are cached per exchange and model, so a second run on the same data, or on data that
grew, reads only what is new. Imported only when a model runs: it imports torch at the top.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ChatkitError
from .files import cache_dir, read_json_object, write_json
from .formatting import IGNORE_INDEX, split_exchanges, tokenize_conversation, tokenize_with_offsets, with_system_prompt
from .forward import labelled_token_losses, padded_batch
from .output import Progress, duration, say

SCORE_VERSION = 2  # bump when what is cached changes: old caches are then read again
PROMPT_CHARS = 200  # the end of the user's turn: the context the answer is read in, and trained with
ANSWER_CHARS = 400  # the opening of the answer that is read, and that a focus exchange trains (~100 tokens)
SCORE_BATCH = 32
SAVE_EVERY_S = 30.0  # what was read so far is kept this often: Ctrl-C loses at most this much
# A word stands out where the base model gives it less than 1 in 400 (6 nats) and 150 times less than the
# answer's median word (5 nats more): a name in plain English does; every word of a language the model
# knows little does not, being no more surprising than its neighbours.
STANDOUT_NATS = 6.0
STANDOUT_MARGIN = 5.0
# A word is part of the user's world where the model's vocabulary does not hold it whole, and it stands out
# in at least two conversations and in at least three quarters of those whose read part holds it: a word
# the model does not know, not a known word that was unexpected once in its place. Only exchanges holding
# such a candidate (an unknown word in two conversations' read parts) are read at all.
RECUR_CONVERSATIONS = 2
RECUR_SHARE = 0.75
# A focus exchange is trained 8 to 16 times, so it must be about those words: at least one recurring word in this
# many tokens. Where one is incidental to a long answer (a Dutch word, a library's name), the exchange is
# left to its conversation: repeated, such exchanges pulled the whole model towards them (held-out loss
# 1.99 against the starter's 1.83 at 30 minutes, docs/PERFORMANCE.md).
FOCUS_TOKENS_PER_WORD = 80
DUPLICATE_SHINGLE = 5  # words per shingle
DUPLICATE_JACCARD = 0.9  # exchanges this alike are one: the first is kept
_WORD = re.compile(r"\w+")


def exchange_units(conversations: Sequence[List[dict]]) -> Tuple[List[List[dict]], List[int]]:
    """Each exchange of each conversation as a conversation of its own (its system message kept), and the
    index of the conversation it came from. An exchange with no answer gives none."""
    units, owners = [], []
    for index, messages in enumerate(conversations):
        system, exchanges = split_exchanges(messages)
        for exchange in exchanges:
            if exchange[0]["role"] == "user" and any(m["role"] == "assistant" for m in exchange):
                answer = next(i for i, m in enumerate(exchange) if m["role"] == "assistant")
                units.append(([system] if system else []) + exchange[:answer + 1])
                owners.append(index)
    return units, owners


def _answer(unit: List[dict]) -> str:
    return next(m["content"] for m in unit if m["role"] == "assistant")


def _read_messages(unit: List[dict]) -> List[dict]:
    """The exchange cut to what is read: the end of the question, the opening of the answer."""
    user = next(m for m in unit if m["role"] == "user")
    return [{"role": "user", "content": user["content"][-PROMPT_CHARS:]},
            {"role": "assistant", "content": _answer(unit)[:ANSWER_CHARS]}]


def unit_key(unit: List[dict]) -> str:
    return hashlib.sha256(json.dumps(_read_messages(unit), ensure_ascii=False).encode()).hexdigest()[:32]


def model_key(source) -> str:
    """The reading model's identity: its path or name, and the size and time of its files."""
    from .models import local_path

    parts = [source.describe()]
    try:
        root = Path(local_path(source.base if source.kind == "adapter" else source))
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        parts += [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files if p.exists()]
    except Exception:  # noqa: BLE001 - a Hub name not on disk: the name alone
        pass
    return hashlib.sha256("\n".join(parts + [f"v{SCORE_VERSION}"]).encode()).hexdigest()[:24]


class ScoreCache:
    """The standout words of each exchange one model has read: `$CHATKIT_CACHE/surprise/<model>.json`,
    written whole (atomically)."""

    def __init__(self, key: str):
        self.path = cache_dir() / "surprise" / f"{key}.json"
        self.standout: Dict[str, List[str]] = {}
        if self.path.is_file():
            try:
                saved = read_json_object(self.path, "")
            except ChatkitError:  # a damaged cache is read again, not an error
                saved = {}
            words = saved.get("standout") if saved.get("version") == SCORE_VERSION else None
            self.standout = {key: [w for w in value if isinstance(w, str)]
                             for key, value in (words if isinstance(words, dict) else {}).items()
                             if isinstance(value, list)}

    def save(self) -> None:
        write_json(self.path, {"version": SCORE_VERSION, "standout": self.standout})


def missing(units: Sequence[List[dict]], cache: ScoreCache) -> List[int]:
    """The units not read yet."""
    return [i for i, unit in enumerate(units) if unit_key(unit) not in cache.standout]


def score_tokens(units: Sequence[List[dict]], indices: Sequence[int]) -> int:
    """About how many tokens reading `indices` takes (for the plan)."""
    return sum(len(m["content"]) for i in indices for m in _read_messages(units[i])) // 4 + 12 * len(indices)


def standout_words(text: str, span: Tuple[int, int], length: int, offsets: Sequence[tuple],
                   losses: Dict[int, float]) -> List[str]:
    """The words of the answer (`length` characters from `span`'s start in `text`) whose surprise, the largest
    loss of a token in them (`losses`, per token position), stands out: lower-cased, numbers left out."""
    start, end = span[0], min(span[1], span[0] + length)
    found, token = [], 0
    for match in _WORD.finditer(text, start, end):
        while token < len(offsets) and offsets[token][1] <= match.start():
            token += 1
        inside, position = [], token
        while position < len(offsets) and offsets[position][0] < match.end():
            if position in losses:
                inside.append(losses[position])
            position += 1
        if inside:
            found.append((match.group().lower(), max(inside)))
    if not found:
        return []
    median = statistics.median(loss for _, loss in found)
    return sorted({word for word, loss in found if loss >= STANDOUT_NATS and loss - median >= STANDOUT_MARGIN
                   and not word.isdigit()})


def _encode(unit: List[dict], tokenizer):
    messages = _read_messages(unit)
    ids, labels, offsets, text, spans = tokenize_with_offsets(messages, tokenizer)
    return {"input_ids": ids, "labels": labels, "offsets": offsets, "text": text, "span": spans[0],
            "length": len(messages[1]["content"])}


@torch.no_grad()
def score(model, tokenizer, units: Sequence[List[dict]], cache: ScoreCache, todo: Sequence[int]) -> None:
    """Read the units `todo` into `cache`: each one's standout words. The cache is written whole every
    SAVE_EVERY_S seconds and at the end: Ctrl-C loses little and leaves no half file."""
    if not todo:
        return
    encoded = {i: _encode(units[i], tokenizer) for i in todo}
    order = sorted(todo, key=lambda i: len(encoded[i]["input_ids"]))  # alike lengths in a batch: little padding
    device = next(model.parameters()).device
    progress, saved = Progress(len(order)), time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), SCORE_BATCH):
            batch = order[start:start + SCORE_BATCH]
            ids, labels = padded_batch([encoded[i] for i in batch], device)
            losses, rows = labelled_token_losses(model, ids, labels)
            per_row = defaultdict(list)
            for row, loss in zip(rows.tolist(), losses.tolist()):
                per_row[row].append(loss)
            for row, i in enumerate(batch):
                unit = encoded[i]
                positions = [p for p in range(1, len(unit["labels"])) if unit["labels"][p] != IGNORE_INDEX]
                cache.standout[unit_key(units[i])] = standout_words(
                    unit["text"], unit["span"], unit["length"], unit["offsets"], dict(zip(positions, per_row[row])))
            progress.update(min(start + SCORE_BATCH, len(order)))
            if time.perf_counter() - saved > SAVE_EVERY_S:
                cache.save()
                saved = time.perf_counter()
    finally:
        progress.close()
        model.train(was_training)
        cache.save()


def _read_words(unit: List[dict]) -> set:
    return {word.lower() for word in _WORD.findall(_answer(unit)[:ANSWER_CHARS])}


class Vocabulary:
    """Which words the tokenizer does not hold whole (in lower case and capitalised, after a space): the words
    a model can be told of and not know. Answers are cached per word."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def unknown(self, word: str) -> bool:
        if word not in self.known:
            self.known[word] = word.isdigit() or any(
                len(self.tokenizer(" " + form, add_special_tokens=False)["input_ids"]) < 2
                for form in (word, word.capitalize()))
        return not self.known[word]


def candidates(units: Sequence[List[dict]], owners: Sequence[int], vocabulary: Vocabulary) -> List[int]:
    """The units worth reading: those whose read part holds an unknown word that the read part of another
    conversation holds too. No other unit can hold a recurring standout word."""
    words = [_read_words(unit) for unit in units]
    seen = defaultdict(set)
    for found, owner in zip(words, owners):
        for word in found:
            seen[word].add(owner)
    return [i for i, found in enumerate(words)
            if any(len(seen[word]) >= RECUR_CONVERSATIONS and vocabulary.unknown(word) for word in found)]


def recurring(units: Sequence[List[dict]], owners: Sequence[int], cache: ScoreCache,
              vocabulary: Vocabulary) -> List[List[str]]:
    """Each unit's unknown standout words that recur across the user's conversations (none for a unit not read)."""
    keys = [unit_key(unit) for unit in units]
    seen, standing = defaultdict(set), defaultdict(set)
    for unit, owner, key in zip(units, owners, keys):
        if key in cache.standout:
            for word in _read_words(unit):
                seen[word].add(owner)
            for word in cache.standout[key]:
                standing[word].add(owner)

    def recurs(word: str) -> bool:
        count = len(standing[word])
        return count >= RECUR_CONVERSATIONS and count >= RECUR_SHARE * len(seen[word]) and vocabulary.unknown(word)

    return [[word for word in cache.standout[key] if recurs(word)] if key in cache.standout else [] for key in keys]


def focus_order(words: Sequence[List[str]], lengths: Dict[int, int], left_out: Sequence[int]) -> List[int]:
    """The units holding recurring standout words, at least one per FOCUS_TOKENS_PER_WORD tokens, the most of
    them per token first (ties in data order), near-duplicates and units with no example (`lengths`) left out."""
    skip = set(left_out)
    chosen = [i for i, found in enumerate(words) if found and i not in skip and i in lengths
              and len(found) * FOCUS_TOKENS_PER_WORD >= lengths[i]]
    return sorted(chosen, key=lambda i: (-len(words[i]) / max(1, lengths[i]), i))


def focus_examples(units: Sequence[List[dict]], words: Sequence[List[str]], left_out: Sequence[int], tokenizer,
                   max_length: int, system_prompt: Optional[str] = None,
                   train_on_prompt: bool = False) -> Tuple[List[int], List[dict]]:
    """(the focus units in the order they are trained, focus_order's, and their examples in that order)."""
    examples = {i: focus_example(units[i], tokenizer, max_length, system_prompt, train_on_prompt)
                for i, found in enumerate(words) if found}
    examples = {i: example for i, example in examples.items() if example is not None}
    order = focus_order(words, {i: e["length"] for i, e in examples.items()}, left_out)
    return order, [examples[i] for i in order]


def focus_example(unit: List[dict], tokenizer, max_length: int, system_prompt: Optional[str] = None,
                  train_on_prompt: bool = False) -> Optional[dict]:
    """The example a focus unit trains: the end of the question and the answer's opening that was read (an
    answer cut there learns no end of turn at the cut). None when no answer token is left."""
    user = next(m for m in unit if m["role"] == "user")
    system = [m for m in unit if m["role"] == "system"]
    messages = with_system_prompt(system + [{"role": "user", "content": user["content"][-PROMPT_CHARS:]},
                                            {"role": "assistant", "content": _answer(unit)}], system_prompt)
    ids, labels = tokenize_conversation(messages, tokenizer)
    first = next((p for p, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None:
        return None
    if len(_answer(unit)) > ANSWER_CHARS:
        cut = first + len(tokenizer(_answer(unit)[:ANSWER_CHARS], add_special_tokens=False)["input_ids"])
        ids, labels = ids[:cut], labels[:cut]
    ids, labels = ids[:max_length], labels[:max_length]
    if first >= len(ids):
        return None
    return {"input_ids": ids, "labels": list(ids) if train_on_prompt else labels, "length": len(ids)}


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _shingles(unit: List[dict]) -> set:
    words = _WORD.findall(" ".join(m["content"] for m in unit if m["role"] != "system").lower())
    if not words:
        return set()
    return {_stable_hash(" ".join(words[i:i + DUPLICATE_SHINGLE]))
            for i in range(max(1, len(words) - DUPLICATE_SHINGLE + 1))}


def near_duplicates(units: Sequence[List[dict]]) -> List[int]:
    """The units that repeat an earlier one (word 5-grams at least 90% shared): a pasted answer asked about
    twice, a conversation exported twice. Candidates share their rarest shingle's bucket, so the check is
    close to linear."""
    sets = [_shingles(unit) for unit in units]
    buckets: Dict[int, List[int]] = {}
    repeated = []
    for index, shingles in enumerate(sets):
        if not shingles:
            continue
        anchors = sorted(shingles)[:4]  # a min-hash of four: sets this alike share one, almost always
        candidates = {j for anchor in anchors for j in buckets.get(anchor, [])}
        if any(len(shingles & sets[j]) / len(shingles | sets[j]) >= DUPLICATE_JACCARD for j in candidates):
            repeated.append(index)
            continue
        for anchor in anchors:
            buckets.setdefault(anchor, []).append(index)
    return repeated


def common_words(words: Sequence[List[str]], count: int = 6) -> List[str]:
    """The recurring words found in the most units: what the focus is about, for the user to see."""
    tally: Dict[str, int] = defaultdict(int)
    for found in words:
        for word in found:
            tally[word] += 1
    return sorted(tally, key=lambda w: (-tally[w], w))[:count]


def describe(units: int, worth: int, read: int, seconds: float, duplicates: int, unread: int,
             words: Sequence[List[str]]) -> str:
    done = _who_read(worth, read, worth - read - unread, seconds)
    focus = sum(1 for found in words if found)
    return (f"selection: {worth} of {units} exchanges hold words the model's vocabulary lacks that recur; read by "
            f"the base model ({done})"
            + (f"; {unread} not read" if unread else "")
            + f"; {focus} hold words it does not know that recur across your conversations"
            + (f" ({', '.join(common_words(words))})" if focus else "")
            + (f"; {duplicates} near-duplicate{'s' * (duplicates != 1)} left out" if duplicates else ""))


def _who_read(worth: int, read: int, kept: int, seconds: float) -> str:
    """How the exchanges worth reading were read: by this run, or by earlier runs (`kept` in the cache)."""
    if not worth:
        return "nothing to read"
    if kept == worth:
        return "all read by an earlier run"
    parts = ([f"{read} read in {duration(seconds)}"] if read else []) + ([f"{kept} by earlier runs"] if kept else [])
    return ", ".join(parts) or "none yet"


def say_scoring(count: int, seconds: float) -> None:
    say(f"reading {count} exchanges with the base model to choose what the budget trains first "
        f"(about {duration(seconds)}; kept for later runs)...")
