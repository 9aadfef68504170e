"""Turning ChatGPT conversations into `{"messages": [...]}` training records: one conversation's records
(`Converter`, by the message policy of policy.py), preference pairs beside them (mining.py), and the output
(the file, written whole, or the records in memory for the trainer)."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import export
from .errors import ChatkitError
from .files import atomic_output, check_outputs
from .formatting import clean_text, count_exchanges, split_exchanges
from .mining import PreferenceWalk
from .options import ConvertOptions
from .policy import (MAX_BRANCHES, TRAINING_RECORD, Stats, conversation_id, conversation_model,
                     custom_instructions, filter_reason, message_turn, normalise_turns, parse_date, timestamp)
from .redact import Redactor


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

    def clean(self, text):
        """Text as it is written: lone surrogates replaced (counted)."""
        if not isinstance(text, str):
            return text
        text, replaced = clean_text(text)
        self.stats.replaced_characters += replaced
        return text

    def _record(self, conversation: dict, messages: List[dict]) -> dict:
        messages = [dict(message, content=self.clean(message["content"])) for message in messages]
        record = {"messages": messages}
        if self.options.metadata:
            title = conversation.get("title")
            if self.redactor and isinstance(title, str):
                title = self.redactor(title)
            record.update(
                id=self.clean(conversation_id(conversation)),
                title=self.clean(title) if isinstance(title, str) else None,
                create_time=timestamp(conversation.get("create_time")),
                model=conversation_model(conversation),
            )
        return record


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
