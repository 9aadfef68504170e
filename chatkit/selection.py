"""What a time budget trains when one pass over the data does not fit: the exchanges the base model finds
most surprising, near-duplicates left out, repeated over several epochs.

Each exchange (a user turn and its answer) is scored by the base model, forward only: its loss per
token on the opening of the answer, given the end of the question. What the model predicts well already
(generic answers) teaches it little; what it finds surprising (the user's own names, facts and ways) is
what a short budget should spend its steps on. Scores are cached per exchange and model, so a second run
on the same data, or on data that grew, pays only for what is new.

Imported only when a model runs: it imports torch at the top.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .errors import ChatkitError
from .files import cache_dir, read_json_object, write_json
from .formatting import split_exchanges, tokenize_conversation
from .forward import labelled_losses, padded_batch
from .output import Progress, duration, say

SCORE_VERSION = 1  # bump when the score's definition changes: old cached scores are then not used
PROMPT_CHARS = 160  # the end of the user's turn, as the context the answer is scored in
ANSWER_CHARS = 240  # the opening of the answer that is scored (about 60 tokens)
SCORE_BATCH = 32
SAVE_EVERY_S = 30.0  # scores done so far are kept this often: Ctrl-C loses at most this much
DUPLICATE_SHINGLE = 5  # words per shingle
DUPLICATE_JACCARD = 0.9  # exchanges this alike are one: the first is kept


def exchange_units(conversations: Sequence[List[dict]]) -> List[List[dict]]:
    """Each exchange of each conversation as a conversation of its own (its system message kept): the
    units a surprise-chosen budget trains. An exchange with no answer gives none."""
    units = []
    for messages in conversations:
        system, exchanges = split_exchanges(messages)
        for exchange in exchanges:
            if exchange[0]["role"] == "user" and any(m["role"] == "assistant" for m in exchange):
                units.append(([system] if system else []) + exchange)
    return units


def _scored_messages(unit: List[dict]) -> List[dict]:
    """The exchange cut to what is scored: the end of the question, the opening of the first answer."""
    user = next(m for m in unit if m["role"] == "user")
    answer = next(m for m in unit if m["role"] == "assistant")
    return [{"role": "user", "content": user["content"][-PROMPT_CHARS:]},
            {"role": "assistant", "content": answer["content"][:ANSWER_CHARS]}]


def unit_key(unit: List[dict]) -> str:
    return hashlib.sha256(json.dumps(_scored_messages(unit), ensure_ascii=False).encode()).hexdigest()[:32]


def model_key(source) -> str:
    """The scored model's identity: its path or name, and the size and time of its files."""
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
    """Cached scores of one model: `$CHATKIT_CACHE/surprise/<model>.json`, written whole (atomically)."""

    def __init__(self, key: str):
        self.path = cache_dir() / "surprise" / f"{key}.json"
        self.scores: Dict[str, float] = {}
        if self.path.is_file():
            try:
                scores = read_json_object(self.path, "").get("scores")
            except ChatkitError:  # a damaged cache is scored again, not an error
                scores = None
            self.scores = {key: float(value) for key, value in (scores if isinstance(scores, dict) else {}).items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)}

    def save(self) -> None:
        write_json(self.path, {"version": SCORE_VERSION, "scores": self.scores})


def missing(units: Sequence[List[dict]], cache: ScoreCache) -> List[int]:
    """The units with no cached score."""
    return [i for i, unit in enumerate(units) if unit_key(unit) not in cache.scores]


def score_tokens(units: Sequence[List[dict]], indices: Sequence[int]) -> int:
    """About how many tokens scoring `indices` reads (for the plan)."""
    return sum(len(m["content"]) for i in indices for m in _scored_messages(units[i])) // 4 + 12 * len(indices)


@torch.no_grad()
def score(model, tokenizer, units: Sequence[List[dict]], cache: ScoreCache, todo: Sequence[int]) -> None:
    """Score the units `todo` into `cache`: each one's loss per token on the opening of its answer. The cache
    is written whole every SAVE_EVERY_S seconds and at the end: Ctrl-C loses little and leaves no half file."""
    if todo:
        encoded = {i: tokenize_conversation(_scored_messages(units[i]), tokenizer) for i in todo}
        order = sorted(todo, key=lambda i: len(encoded[i][0]))  # alike lengths in a batch: little padding
        device = next(model.parameters()).device
        progress, saved = Progress(len(order)), time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), SCORE_BATCH):
                batch = order[start:start + SCORE_BATCH]
                ids, labels = padded_batch([{"input_ids": encoded[i][0], "labels": encoded[i][1]} for i in batch],
                                           device)
                for i, value in zip(batch, labelled_losses(model, ids, labels).tolist()):
                    cache.scores[unit_key(units[i])] = round(value, 4)
                progress.update(min(start + SCORE_BATCH, len(order)))
                if time.perf_counter() - saved > SAVE_EVERY_S:
                    cache.save()
                    saved = time.perf_counter()
        finally:
            progress.close()
            model.train(was_training)
            cache.save()


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _shingles(unit: List[dict]) -> set:
    words = re.findall(r"\w+", " ".join(m["content"] for m in unit if m["role"] != "system").lower())
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


def surprise_order(scores: Sequence[Optional[float]], left_out: Sequence[int], seed: int) -> List[int]:
    """The units to take, most surprising first (ties in data order), near-duplicates left out; units not
    scored (a budget too short to score them all) after the scored ones, in a seeded random order."""
    import random

    skip = set(left_out)
    scored = sorted((i for i, s in enumerate(scores) if s is not None and i not in skip), key=lambda i: (-scores[i], i))
    rest = [i for i, s in enumerate(scores) if s is None and i not in skip]
    random.Random(seed).shuffle(rest)
    return scored + rest


def describe(units: int, scored: int, seconds: float, duplicates: int, unscored: int) -> str:
    done = f"{scored} scored in {duration(seconds)}, the rest kept from earlier runs" if scored else (
        "all scored by an earlier run")
    return (f"selection: {units} exchanges ranked by how surprising the base model finds them ({done})"
            + (f"; {unscored} not scored, taken last" if unscored else "")
            + (f"; {duplicates} near-duplicates left out" if duplicates else ""))


def say_scoring(count: int, seconds: float) -> None:
    say(f"scoring {count} exchanges with the base model to choose what the budget trains "
        f"(about {duration(seconds)}; kept for later runs)...")
