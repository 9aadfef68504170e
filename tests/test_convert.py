"""convert_chatgpt_export.py on fixtures written for the project: exact expected records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import convert_chatgpt_export as cli
from export_builder import Tree, message, pairs, read_records, simple, write_json, write_zip


def convert(tmp_path, data, *flags, name="out.json", capsys=None):
    source = data if not isinstance(data, (list, dict)) else write_json(tmp_path / "conversations.json", data)
    out = tmp_path / name
    code = cli.main([str(source), str(out), "--quiet", "--overwrite", *flags])
    assert code == 0
    return read_records(out)


def branching_conversation():
    """u1 -> a1 -> (edit) u2/u2' ; u2 -> (regenerate) a2/a2'; current is u2' -> a3."""
    tree = Tree()
    tree.add(message("system", "", hidden=True))
    top = tree.chain(("user", "Hi"), ("assistant", "Hello!"))
    u2 = tree.add(message("user", "Tell me a joke"), parent=top)
    tree.add(message("assistant", "Joke one"), parent=u2)
    tree.add(message("assistant", "Joke two"), parent=u2)
    tree.add(message("user", "Tell me a story"), parent=top)
    tree.add(message("assistant", "Once upon a time."))
    return tree.conversation("branchy")


def test_current_path_not_dict_order(tmp_path):
    records = convert(tmp_path, [branching_conversation()])
    assert [pairs(r) for r in records] == [[
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "Tell me a story"), ("assistant", "Once upon a time."),
    ]]


def test_all_branches(tmp_path):
    records = convert(tmp_path, [branching_conversation()], "--all-branches")
    assert [[m["content"] for m in r["messages"]] for r in records] == [
        ["Hi", "Hello!", "Tell me a story", "Once upon a time."],
        ["Hi", "Hello!", "Tell me a joke", "Joke one"],
        ["Hi", "Hello!", "Tell me a joke", "Joke two"],
    ]


def test_all_branches_does_not_duplicate_hidden_tails(tmp_path):
    tree = Tree()
    end = tree.chain(("user", "Q"), ("assistant", "A"))
    tree.add(message("system", "memory updated", hidden=True), parent=end)  # a hidden leaf
    tree.add(message("user", "Unanswered edit"), parent=tree.mapping[end]["parent"])  # trailing user only
    records = convert(tmp_path, [tree.conversation("c", current=end)], "--all-branches")
    assert [pairs(r) for r in records] == [[("user", "Q"), ("assistant", "A")]]


def test_hidden_system_custom_instructions_thoughts_and_tools_are_dropped(tmp_path, capsys):
    tree = Tree(root_message=True)
    tree.add(message("system", "You are ChatGPT", hidden=True))
    tree.add(message("user", None, content={"content_type": "user_editable_context",
                                             "user_profile": "I am a baker.", "user_instructions": "Be brief."},
                     hidden=True))
    tree.add(message("user", "Plot sin(x)"))
    tree.add(message("assistant", None, content={"content_type": "thoughts", "thoughts": [
        {"summary": "Plan", "content": "secret thinking", "finished": True}]}))
    tree.add(message("assistant", None, content={"content_type": "reasoning_recap", "content": "Thought for 3s"}))
    tree.add(message("assistant", None, content={"content_type": "code", "language": "python",
                                                  "text": "plot(sin)"}, recipient="python"))
    tree.add(message("tool", None, content={"content_type": "execution_output", "text": "<figure>"}, name="python"))
    tree.add(message("assistant", "Here is the plot."))
    tree.add(message("user", "Search the news"))
    tree.add(message("assistant", None, content={"content_type": "text", "parts": ["search('news')"]},
                     recipient="browser"))
    tree.add(message("tool", None, content={"content_type": "tether_browsing_display", "result": "headlines",
                                             "summary": None}, name="browser"))
    tree.add(message("tool", None, content={"content_type": "tether_quote", "text": "quote", "url": "u",
                                             "title": "t", "domain": "d"}, name="browser"))
    tree.add(message("assistant", "Today's news is calm.", weight=1.0))
    tree.add(message("assistant", "zero weight", weight=0.0))
    conv = tree.conversation("tools")
    records = convert(tmp_path, [conv], "--no-custom-instructions")
    assert pairs(records[0]) == [
        ("user", "Plot sin(x)"), ("assistant", "Here is the plot."),
        ("user", "Search the news"), ("assistant", "Today's news is calm."),
    ]
    err = capsys.readouterr().err
    for line in ("  tool call: 2", "  tool result (execution_output): 1", "  tool result (tether_browsing_display): 1",
                 "  tool result (tether_quote): 1", "  thoughts: 1", "  reasoning_recap: 1"):
        assert line in err
    with_tools = convert(tmp_path, [conv], "--include-tools", "--no-custom-instructions")
    assert pairs(with_tools[0])[1] == (
        "assistant", "```python\nplot(sin)\n```\n\n```python output\n<figure>\n```\n\nHere is the plot.")
    assert pairs(with_tools[0])[3] == (
        "assistant", "```browser\nsearch('news')\n```\n\n```browser output\nheadlines\n```\n\n"
                     "```browser output\nquote\n```\n\nToday's news is calm.")
    custom = convert(tmp_path, [conv])  # custom instructions are the system message by default
    assert custom[0]["messages"][0] == {"role": "system", "content": "I am a baker.\n\nBe brief."}
    assert "custom instructions used as the system message: 1 different" in capsys.readouterr().err
    system = convert(tmp_path, [conv], "--system-prompt", "You are me.", "--no-custom-instructions")
    assert system[0]["messages"][0] == {"role": "system", "content": "You are me."}


def test_legacy_custom_instructions_metadata(tmp_path):
    tree = Tree()
    msg = message("system", "", hidden=True)
    msg["metadata"]["user_context_message_data"] = {"about_user_message": "Dev", "about_model_message": "Short"}
    tree.add(msg)
    tree.chain(("user", "Q"), ("assistant", "A"))
    records = convert(tmp_path, [tree.conversation("x")], "--custom-instructions")
    assert records[0]["messages"][0]["content"] == "Dev\n\nShort"


def test_multimodal_parts_and_placeholder(tmp_path):
    tree = Tree()
    tree.add(message("user", None, content={"content_type": "multimodal_text", "parts": [
        {"content_type": "image_asset_pointer", "asset_pointer": "file-service://x", "width": 10, "height": 10},
        "What is in this picture?",
    ]}))
    tree.add(message("assistant", "A cat."))
    tree.add(message("user", None, content={"content_type": "multimodal_text", "parts": [
        {"content_type": "audio_transcription", "text": "spoken words"},
        {"content_type": "audio_asset_pointer", "asset_pointer": "x"}]}))
    tree.add(message("assistant", "Heard you."))
    conv = tree.conversation("mm")
    assert pairs(convert(tmp_path, [conv])[0]) == [
        ("user", "What is in this picture?"), ("assistant", "A cat."),
        ("user", "spoken words"), ("assistant", "Heard you.")]
    marked = convert(tmp_path, [conv], "--image-placeholder", "[image]")
    assert marked[0]["messages"][0]["content"] == "[image]\nWhat is in this picture?"


def test_joins_trims_and_keeps_text_exactly(tmp_path):
    text = "  Ünïcødé 😀 مرحبا\n\n\tindented  "
    tree = Tree()
    tree.chain(("assistant", "leading assistant"), ("user", "part one"), ("user", "part two"),
               ("assistant", ""), ("assistant", text), ("user", "trailing user"))
    records = convert(tmp_path, [tree.conversation("j")], name="out.jsonl")
    assert pairs(records[0]) == [("user", "part one\n\npart two"), ("assistant", text)]


def test_null_title_root_without_message_hidden_current_node(tmp_path):
    tree = Tree(root_message=True)
    tree.chain(("user", "Q"), ("assistant", "A"))
    hidden_current = tree.add(message("assistant", "", hidden=True))
    conv = tree.conversation("n", title=None, current=hidden_current)
    records = convert(tmp_path, [conv], "--metadata")
    assert records == [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                        "id": "n", "title": None, "create_time": 1700000000.0, "model": None}]


def test_split_export_in_zip_with_other_members(tmp_path):
    archive = write_zip(tmp_path / "export.zip", {
        "conversations-000.json": [simple("a", ("user", "one"), ("assistant", "1"))],
        "conversations-001.json": [simple("b", ("user", "two"), ("assistant", "2"))],
        "conversations-010.json": [simple("c", ("user", "ten"), ("assistant", "10"))],
        "export_manifest.json": {"files": 3},
        "user.json": {"email": "me@example.com", "phone_number": "+1 555 0100"},
        "chat.html": "<html>var jsonData = [];</html>",
    })
    records = convert(tmp_path, archive, name="out.jsonl")
    assert [r["messages"][0]["content"] for r in records] == ["one", "two", "ten"]
    assert "me@example.com" not in (tmp_path / "out.jsonl").read_text()


def test_folder_input_and_wrapper_and_single_object(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    write_json(folder / "conversations.json", {"conversations": [simple("w", ("user", "wrapped"), ("assistant", "ok"))]})
    assert pairs(convert(tmp_path, folder)[0])[0] == ("user", "wrapped")
    single = write_json(tmp_path / "one.json", simple("s", ("user", "single"), ("assistant", "ok")))
    assert pairs(convert(tmp_path, single)[0])[0] == ("user", "single")


def test_duplicates_across_exports_keep_newest(tmp_path):
    old = write_json(tmp_path / "old.json", [
        simple("same", ("user", "Q"), ("assistant", "old answer"), update_time=100.0),
        simple("only-old", ("user", "X"), ("assistant", "Y"), update_time=50.0)])
    new = write_json(tmp_path / "new.json", [simple("same", ("user", "Q"), ("assistant", "new answer"), update_time=200.0)])
    older_again = write_json(tmp_path / "older.json", [simple("same", ("user", "Q"), ("assistant", "oldest"), update_time=10.0)])
    out = tmp_path / "merged.json"
    assert cli.main([str(old), str(new), str(older_again), str(out), "--quiet"]) == 0
    assert sorted(r["messages"][1]["content"] for r in read_records(out)) == ["Y", "new answer"]


def test_redaction(tmp_path, capsys):
    secret = ("mail me at jane.doe@example.org or call +1 415-555-0132, key sk-proj-abcdefghijklmnop1234, "
              "gh token ghp_abcdefghijklmnopqrstuvwxyz0123456789, aws AKIAABCDEFGHIJKLMNOP, "
              "Authorization: Bearer abcdefghijklmnopqrstuvwxyz123456, server 192.168.1.20, card 4111 1111 1111 1111")
    records = convert(tmp_path, [simple("r", ("user", secret), ("assistant", "noted"))], "--redact")
    assert records[0]["messages"][0]["content"] == (
        "mail me at [EMAIL] or call [PHONE], key [API_KEY], gh token [GITHUB_TOKEN], aws [AWS_KEY], "
        "Authorization: Bearer [BEARER_TOKEN], server [IP_ADDRESS], card [CARD_NUMBER]")
    err = capsys.readouterr().err
    assert "redacted: 8" in err and "EMAIL: 1" in err


def test_redaction_leaves_ordinary_numbers(tmp_path):
    text = "In 2023 we sold 1234 units; version 1.2.3; order 4111 1111 1111 1112"  # last fails Luhn
    records = convert(tmp_path, [simple("r", ("user", text), ("assistant", "ok"))], "--redact")
    assert records[0]["messages"][0]["content"] == text


def filter_data():
    day = 86400.0
    base = 1704067200.0  # 2024-01-01T00:00:00Z
    a = simple("a", ("user", "python question"), ("assistant", "answer"), title="Python help",
               create_time=base, default_model_slug="gpt-4o")
    b = simple("b", ("user", "cooking"), ("assistant", "recipe"), title="Dinner", create_time=base + 40 * day,
               default_model_slug="gpt-3.5-turbo", is_archived=True)
    c = simple("c", ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), title="Two",
               create_time=base + 400 * day)
    c["mapping"][c["current_node"]]["message"]["metadata"]["model_slug"] = "o1"
    return [a, b, c]


@pytest.mark.parametrize("flags, expected", [
    ([], ["a", "b", "c"]),
    (["--since", "2024-02-01"], ["b", "c"]),
    (["--until", "2024-01-01"], ["a"]),
    (["--since", "2024-01-02", "--until", "2024-12-31"], ["b"]),
    (["--title", "^py"], ["a"]),
    (["--chatgpt-model", "gpt-4o"], ["a"]),
    (["--chatgpt-model", "o1"], ["c"]),
    (["--exclude-archived"], ["a", "c"]),
    (["--min-exchanges", "2"], ["c"]),
    (["--max-chars", "20"], ["b", "c"]),  # a has 21 characters
])
def test_filters(tmp_path, flags, expected):
    records = convert(tmp_path, filter_data(), "--metadata", *flags)
    assert [r["id"] for r in records] == expected


def test_truncate_cuts_at_exchange_boundary(tmp_path, capsys):
    conv = simple("t", ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2 is long"))
    records = convert(tmp_path, [conv], "--max-chars", "10", "--truncate")
    assert pairs(records[0]) == [("user", "q1"), ("assistant", "a1")]
    assert "truncated at an exchange: 1" in capsys.readouterr().err


def test_max_tokens_with_tokenizer(tmp_path, tiny_llama):
    conv = simple("t", ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2 " * 50))
    records = convert(tmp_path, [conv], "--max-conversation-tokens", "30", "--tokenizer", str(tiny_llama), "--truncate")
    assert pairs(records[0]) == [("user", "q1"), ("assistant", "a1")]


def test_both_formats_and_statistics(tmp_path, capsys):
    data = [branching_conversation(), simple("empty", ("user", "nobody answered"))]
    as_json = convert(tmp_path, data, "--preview", "1")
    as_jsonl = convert(tmp_path, data, name="out.jsonl")
    assert as_json == as_jsonl
    assert (tmp_path / "out.json").read_text().startswith("[\n")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1
    err = capsys.readouterr().err
    assert "[user]\nHi\n" in err  # the preview
    for line in ("conversations read:    2", "conversations kept:    1", "messages written:      4",
                 "conversations with branches: 1", "  no exchange: 1"):
        assert line in err
    forced = tmp_path / "forced.json"
    assert cli.main([str(tmp_path / "conversations.json"), str(forced), "--jsonl", "--quiet"]) == 0
    assert json.loads(forced.read_text().splitlines()[0])["messages"][0]["content"] == "Hi"


# ------------------------------------------------------------------------------- bad input


def run_bad(tmp_path, source, capsys):
    out = tmp_path / "out.json"
    out.write_text("GOOD OLD OUTPUT")
    code = cli.main([str(source), str(out), "--quiet", "--overwrite"])
    err = capsys.readouterr().err
    assert out.read_text() == "GOOD OLD OUTPUT"  # never clobbered
    assert not list(tmp_path.glob(".*.part"))  # no half file left
    return code, err


def test_not_an_export(tmp_path, capsys):
    source = tmp_path / "notes.txt"
    source.write_text("hello")
    code, err = run_bad(tmp_path, source, capsys)
    assert code == 1 and err.startswith(f"error: {source}: not a ChatGPT export")


def test_truncated_json(tmp_path, capsys):
    good = json.dumps([simple("a", ("user", "Q"), ("assistant", "A")), simple("b", ("user", "Q"), ("assistant", "A"))])
    source = tmp_path / "conversations.json"
    source.write_text(good[: len(good) - 40])
    code, err = run_bad(tmp_path, source, capsys)
    assert code == 1
    assert f"error: {source}: the file ends inside conversation 1" in err and "download it again" in err
    assert "Traceback" not in err


def test_zip_without_conversations(tmp_path, capsys):
    archive = write_zip(tmp_path / "export.zip", {"user.json": {}, "chat.html": "<html/>"})
    code, err = run_bad(tmp_path, archive, capsys)
    assert code == 1 and "the zip holds no conversations.json" in err


def test_bad_conversations_are_counted_not_fatal(tmp_path, capsys):
    good = simple("good", ("user", "Q"), ("assistant", "A"))
    no_mapping = {"id": "nm", "title": "x", "current_node": "a"}
    bad_current = simple("bc", ("user", "Q"), ("assistant", "A"))
    bad_current["current_node"] = "missing"
    cycle = simple("cy", ("user", "Q"), ("assistant", "A"))
    root = next(k for k, n in cycle["mapping"].items() if n["parent"] is None)
    cycle["mapping"][root]["parent"] = cycle["current_node"]
    weird = simple("w", ("user", "Q"), ("assistant", "A"))
    weird["mapping"][weird["current_node"]]["message"]["author"] = "not a dict"
    records = convert(tmp_path, [no_mapping, bad_current, cycle, "not an object", weird, good])
    assert [pairs(r) for r in records] == [[("user", "Q"), ("assistant", "A")]]
    err = capsys.readouterr().err
    for line in ("no mapping: 1", "current_node not in mapping: 1", "cycle in parent links: 1",
                 "not a conversation object: 1", "malformed conversation: 1"):
        assert line in err
    assert "conversation 4: malformed" in err


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys):
    raw = json.dumps([simple("u", ("user", "caf\u00e9 XX"), ("assistant", "A"))]).replace("XX", "\\u0000")
    data = raw.encode("utf-8").replace(b"\\u0000", b"\xff\xfe")
    source = tmp_path / "conversations.json"
    source.write_bytes(data)
    records = convert(tmp_path, source)
    assert records[0]["messages"][0]["content"] == "caf\u00e9 \ufffd\ufffd"
    assert "2 bytes were not valid UTF-8" in capsys.readouterr().err


def test_zip_member_with_dotdot_path_is_skipped(tmp_path, capsys):
    archive = write_zip(tmp_path / "export.zip", {
        "conversations.json": [simple("a", ("user", "safe"), ("assistant", "ok"))],
        "../conversations-001.json": [simple("b", ("user", "evil"), ("assistant", "no"))],
    })
    records = convert(tmp_path, archive)
    assert [r["messages"][0]["content"] for r in records] == ["safe"]
    assert "skipped zip member with an unsafe path" in capsys.readouterr().err


def test_missing_input_and_output_equals_input(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope.zip"), str(tmp_path / "o.json")]) == 1
    assert "nope.zip: no such file or directory" in capsys.readouterr().err
    source = write_json(tmp_path / "c.json", [])
    assert cli.main([str(source), str(source)]) == 1
    assert "OUTPUT is also an INPUT" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["only-one-path"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["a.json", "b.json", "--truncate"])


def test_streaming_reads_across_chunk_boundaries(tmp_path, monkeypatch):
    from chatkit import export

    monkeypatch.setattr(export, "CHUNK_CHARS", 97)  # many conversations straddle a chunk edge
    data = [simple(f"c{i}", ("user", f"question {i} ü😀"), ("assistant", "answer " * i)) for i in range(40)]
    records = convert(tmp_path, data)
    # conversation 0's answer is empty, so it has no exchange
    assert [r["messages"][0]["content"] for r in records] == [f"question {i} ü😀" for i in range(1, 40)]
    assert records[-1]["messages"][1]["content"] == "answer " * 39


def test_the_readme_sample_export(tmp_path, capsys):
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "docs" / "sample-export.zip"
    out = tmp_path / "my-conversations.jsonl"
    assert cli.main([str(sample), str(out), "--preview", "2"]) == 0
    records = read_records(out)
    assert [pairs(r)[-1][1][:30] for r in records] == [
        "Try \"Mother Dough\": it is what", "Around 24 °C (75 °F). Cooler k", "Dense patches near the bottom "]
    assert "sample@example.com" not in out.read_text()
    assert "conversations read:    4\nconversations kept:    3" in capsys.readouterr().err


@pytest.mark.parametrize("old, new, value, expected", [
    ("--model", "--chatgpt-model", "o1", ["c"]),
    ("--max-length", "--max-chars", "20", ["b", "c"]),
])
def test_old_flag_spellings_still_work_with_a_note(tmp_path, capsys, old, new, value, expected):
    records = convert(tmp_path, filter_data(), "--metadata", old, value)
    assert [r["id"] for r in records] == expected
    assert f"note: {old} is now {new}" in capsys.readouterr().err


PATHOLOGICAL = {"dots": "a." * 100000, "address": "x@" + "a." * 100000, "dashes": "a-" * 100000,
                "keys": "-----BEGIN RSA PRIVATE KEY-----" * 3000}


@pytest.mark.parametrize("kind", sorted(PATHOLOGICAL))
def test_redaction_runs_in_linear_time_on_pathological_text(kind):
    """Each pattern's repeats are bounded: these took minutes before (checked in a child that is stopped at 60 s)."""
    import subprocess
    import sys

    text = PATHOLOGICAL[kind]
    code = ("import sys; from chatkit.redact import Redactor; r = Redactor(); "
            "out = r(sys.stdin.read()); print(len(out), sum(r.counts.values()))")
    done = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parent.parent))
    length, found = map(int, done.stdout.split())
    assert found == 0 and length == len(text)  # none of these is personal data
