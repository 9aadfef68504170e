"""convert_chatgpt_export.py on bad input and faults: one clear line, nothing lost, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import zipfile

import pytest

import convert_chatgpt_export as cli
from export_builder import Tree, message, pairs, read_records, simple, write_json, write_zip


def run(*args):
    return cli.main([str(a) for a in args] + ["--quiet"])


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".part") or p.name.startswith(".tmp-")]


def test_output_that_is_the_input_zip_by_another_spelling_is_refused(tmp_path, capsys, monkeypatch):
    archive = write_zip(tmp_path / "exp.zip", {"conversations.json": [simple("a", ("user", "Q"), ("assistant", "A"))]})
    before = archive.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert run("exp.zip", "./exp.zip", "--overwrite") == 1
    assert "OUTPUT is also an INPUT" in capsys.readouterr().err
    assert archive.read_bytes() == before


def test_output_that_is_a_file_of_the_input_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "exp"
    folder.mkdir()
    member = write_json(folder / "conversations-000.json", [simple("a", ("user", "Q"), ("assistant", "A"))])
    before = member.read_bytes()
    assert run(folder, member, "--overwrite") == 1
    assert "OUTPUT is also an INPUT" in capsys.readouterr().err
    assert member.read_bytes() == before


def test_keeping_nothing_is_an_error_and_leaves_the_old_output(tmp_path, capsys):
    source = write_json(tmp_path / "conversations.json", [simple("a", ("user", "only a question"))])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    out.chmod(0o644)
    assert run(source, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {source}: no conversation was kept") and "was not written" in err
    assert out.read_text() == "precious\n" and stat.S_IMODE(out.stat().st_mode) == 0o644
    assert not leftovers(tmp_path)


def test_training_data_given_to_the_converter_points_to_the_trainer(tmp_path, capsys):
    data = write_json(tmp_path / "train.json", [{"messages": [{"role": "user", "content": "Q"},
                                                              {"role": "assistant", "content": "A"}]}])
    assert run(data, tmp_path / "out.jsonl") == 1
    err = capsys.readouterr().err
    assert "holds training data" in err and f"train_chatgpt_model.py --data {data}" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_existing_output_needs_overwrite_and_a_folder_is_no_output(tmp_path, capsys):
    source = write_json(tmp_path / "conversations.json", [simple("a", ("user", "Q"), ("assistant", "A"))])
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    assert run(source, out) == 1
    assert "exists already; pass --overwrite" in capsys.readouterr().err and out.read_text() == "old\n"
    assert run(source, out, "--overwrite") == 0 and pairs(read_records(out)[0]) == [("user", "Q"), ("assistant", "A")]
    assert run(source, tmp_path) == 1
    assert "OUTPUT is a folder" in capsys.readouterr().err


def test_a_lone_surrogate_is_replaced_not_fatal(tmp_path, capsys):
    raw = json.dumps([simple("s", ("user", "broken XX here"), ("assistant", "fine"))]).replace("XX", "\\ud800")
    source = tmp_path / "conversations.json"
    source.write_text(raw)
    assert run(source, tmp_path / "out.jsonl") == 0
    assert read_records(tmp_path / "out.jsonl")[0]["messages"][0]["content"] == "broken \ufffd here"
    assert "1 broken characters (lone UTF-16 surrogates) became U+FFFD" in capsys.readouterr().err


def damaged_zip(tmp_path, how):
    conversations = [simple(f"c{i}", ("user", f"question {i} " * 50), ("assistant", "answer " * 80)) for i in range(40)]
    archive = write_zip(tmp_path / "export.zip", {"conversations.json": conversations})
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as reader:
        info = reader.getinfo("conversations.json")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    if how == "deflate":
        data[start + 10: start + 200] = b"\xff" * 190  # the compressed stream itself
    else:
        data[start + info.compress_size - 8: start + info.compress_size - 4] = b"\x00\x00\x00\x00"
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.parametrize("how", ["deflate", "crc"])
def test_a_damaged_zip_is_one_line(tmp_path, capsys, how):
    archive = damaged_zip(tmp_path, how)
    assert run(archive, tmp_path / "out.jsonl") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {archive}:conversations.json") and "download the export again" in err
    assert "Traceback" not in err and not (tmp_path / "out.jsonl").exists() and not leftovers(tmp_path)


def test_all_branches_follows_each_child_once(tmp_path):
    tree = Tree()
    parent = tree.chain(("user", "Q"), ("assistant", "A"))
    for step in range(24):  # every node lists its only child twice: 2**24 paths if followed naively
        child = tree.add(message("user" if step % 2 == 0 else "assistant", f"turn {step}"), parent=parent)
        tree.mapping[parent]["children"].append(child)
        parent = child
    assert run(write_json(tmp_path / "conversations.json", [tree.conversation("dup")]), tmp_path / "o.json",
               "--all-branches") == 0
    assert len(read_records(tmp_path / "o.json")) == 1


def test_all_branches_is_capped_and_says_so(tmp_path, capsys):
    from chatkit.conversion import MAX_BRANCHES

    tree = Tree()
    root = tree.chain(("user", "Q"))
    for index in range(MAX_BRANCHES + 10):  # that many regenerated answers
        tree.add(message("assistant", f"answer {index}"), parent=root)
    assert run(write_json(tmp_path / "conversations.json", [tree.conversation("wide")]), tmp_path / "o.json",
               "--all-branches") == 0
    assert len(read_records(tmp_path / "o.json")) == MAX_BRANCHES
    assert f"conversations with over {MAX_BRANCHES} branches, cut to the first {MAX_BRANCHES}: 1" in \
        capsys.readouterr().err


def test_parts_given_as_one_string_stay_whole(tmp_path):
    conversation = simple("p", ("user", "Q"), ("assistant", "placeholder"))
    answer = conversation["mapping"][conversation["current_node"]]["message"]
    answer["content"]["parts"] = "Hello world"
    assert run(write_json(tmp_path / "conversations.json", [conversation]), tmp_path / "o.json") == 0
    assert read_records(tmp_path / "o.json")[0]["messages"][1]["content"] == "Hello world"


def test_continue_generating_halves_are_joined_exactly(tmp_path):
    tree = Tree()
    first = message("assistant", "def f(x):\n    return x +")
    first["metadata"]["finish_details"] = {"type": "max_tokens"}
    parent = tree.chain(("user", "Write f"))
    parent = tree.add(first, parent=parent)
    parent = tree.add(message("assistant", " 1\n```"), parent=parent)
    parent = tree.add(message("user", "And g?"), parent=parent)
    parent = tree.add(message("assistant", "Here is g."), parent=parent)
    tree.add(message("assistant", "It is short."), parent=parent)
    assert run(write_json(tmp_path / "conversations.json", [tree.conversation("cut")]), tmp_path / "o.json") == 0
    answers = [m["content"] for m in read_records(tmp_path / "o.json")[0]["messages"] if m["role"] == "assistant"]
    assert answers == ["def f(x):\n    return x + 1\n```", "Here is g.\n\nIt is short."]


def test_sigterm_while_writing_leaves_no_half_file(tmp_path, monkeypatch, capsys):
    from chatkit import conversion

    original = conversion.write_records

    def killed(staging, winners, out, options, stats):
        out.write("[\n  partial")
        os.kill(os.getpid(), signal.SIGTERM)
        return original(staging, winners, out, options, stats)

    monkeypatch.setattr(conversion, "write_records", killed)
    source = write_json(tmp_path / "conversations.json", [simple("a", ("user", "Q"), ("assistant", "A"))])
    assert run(source, tmp_path / "out.json") == 143  # 128 + SIGTERM, as a shell reports it
    assert not (tmp_path / "out.json").exists() and not leftovers(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the script's alone


def test_a_zip_named_file_that_is_no_zip(tmp_path, capsys):
    fake = tmp_path / "export.zip"
    fake.write_bytes(b"PK\x03\x04 not really a zip")
    assert run(fake, tmp_path / "o.json") == 1
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("flags, fragment", [
    (["--since", "last tuesday"], "--since 'last tuesday' is not YYYY-MM-DD"),
    (["--min-exchanges", "-1"], "--min-exchanges must not be negative"),
    (["--truncate"], "--truncate needs --max-chars or --max-conversation-tokens"),
])
def test_bad_flags_are_usage_errors(tmp_path, capsys, flags, fragment):
    with pytest.raises(SystemExit) as info:
        cli.main(["in.json", "out.json", *flags])
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_bad_title_regex_and_token_limit_without_tokenizer(tmp_path, capsys):
    source = write_json(tmp_path / "conversations.json", [simple("a", ("user", "Q"), ("assistant", "A"))])
    assert run(source, tmp_path / "o.json", "--title", "([") == 1
    assert "--title '([' is not a valid regular expression" in capsys.readouterr().err
    assert run(source, tmp_path / "o.json", "--max-conversation-tokens", "10") == 1
    assert "--max-conversation-tokens needs --tokenizer MODEL" in capsys.readouterr().err


def test_all_branches_of_a_100000_node_chain_is_one_walk(tmp_path):
    """A linear conversation of 100,000 nodes: --all-branches walks it once (it copied the path at every node)."""
    tree = Tree()
    for index in range(50000):
        tree.add(message("user", f"q{index}"))
        tree.add(message("assistant", f"a{index}"))
    export = tmp_path / "conversations.json"
    write_json(export, [tree.conversation("long")])
    out = tmp_path / "out.jsonl"
    assert cli.main([str(export), str(out), "--all-branches"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1 and len(records[0]["messages"]) == 100000
    assert records[0]["messages"][-1] == {"role": "assistant", "content": "a49999"}


def test_overwrite_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    """A private training file (600) stays private when it is converted again over itself."""
    source = write_json(tmp_path / "conversations.json", [simple("a", ("user", "Q"), ("assistant", "A"))])
    out = tmp_path / "out.jsonl"
    out.write_text("old")
    out.chmod(0o600)
    assert run(source, out, "--overwrite") == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.read_text() != "old"
    fresh = tmp_path / "new.jsonl"
    assert run(source, fresh) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # a new file: the user's ordinary mode


def test_a_utf16_export_says_what_it_is(tmp_path, capsys):
    source = tmp_path / "conversations.json"
    source.write_text(json.dumps([simple("a", ("user", "Q"), ("assistant", "A"))]), encoding="utf-16")
    assert run(source, tmp_path / "o.json") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {source} is UTF-16 text") and "save it as UTF-8" in error
    assert not (tmp_path / "o.json").exists()


def test_an_export_too_large_to_be_one_is_refused_before_it_takes_the_machine(tmp_path, capsys):
    """A small zip that unpacks to one 80 MB string, and a thumbs file of 70 MB of spaces: one line each,
    read no further than the limits (docs/RELIABILITY.md); a message past a million characters leaves its
    conversation out and keeps the rest."""
    import zipfile

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("conversations.json", '[{"title": "' + "a" * (80 << 20) + '"}]')
    assert bomb.stat().st_size < 1 << 20
    assert run(bomb, tmp_path / "out.jsonl") == 1
    err = capsys.readouterr().err
    assert "conversation 0 (from character 1) is over 64 MB of JSON" in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()

    export = tmp_path / "export.zip"
    with zipfile.ZipFile(export, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("conversations.json", json.dumps([simple("a", ("user", "Q"), ("assistant", "A"))]))
        archive.writestr("message_feedback.json", "[" + " " * (70 << 20) + "]")
    assert run(export, tmp_path / "out.jsonl", "--preferences", tmp_path / "p.jsonl") == 1
    err = capsys.readouterr().err
    assert f"{export}:message_feedback.json: 73 MB, far more than thumbs up and down take" in err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "p.jsonl").exists()

    long = simple("long", ("user", "x" * 1_000_001), ("assistant", "A"))
    source = write_json(tmp_path / "conversations.json", [long, simple("b", ("user", "Q"), ("assistant", "A"))])
    assert run(source, tmp_path / "out.jsonl") == 0
    assert [pairs(r) for r in read_records(tmp_path / "out.jsonl")] == [[("user", "Q"), ("assistant", "A")]]
    assert "a message over 1,000,000 characters" in capsys.readouterr().err


def test_training_data_with_a_message_past_a_million_characters_leaves_that_conversation_out():
    from chatkit.datasets import DataReport, add_records

    report, conversations = DataReport(), []
    records = [{"messages": [{"role": "user", "content": "x" * 1_000_001}, {"role": "assistant", "content": "A"}]},
               {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    add_records(records, "data.json", report, conversations)
    assert conversations == [records[1]["messages"]]
    assert report.skipped == {"conversations with a message over 1,000,000 characters": 1}


def test_times_ids_and_titles_of_other_json_types_are_read_or_left_aside(tmp_path, capsys):
    """update_time as a string (a number's or an ISO date's), ids and titles of the wrong JSON type: the
    conversations are kept, the newest copy wins, and nothing ends in a traceback."""
    copies = [simple("same", ("user", "Q"), ("assistant", "old answer"), update_time="1700000000"),
              simple("same", ("user", "Q"), ("assistant", "new answer"), update_time="2023-11-15T00:00:00Z"),
              simple("x", ("user", "Q2"), ("assistant", "A2"), update_time="yesterday", title=7),
              simple(["a", "list"], ("user", "Q3"), ("assistant", "A3"), create_time={"no": 1}),
              simple(42, ("user", "Q4"), ("assistant", "A4"))]
    copies[3]["conversation_id"] = ["a", "list"]
    source = write_json(tmp_path / "conversations.json", copies)
    assert run(source, tmp_path / "out.jsonl", "--metadata") == 0
    records = read_records(tmp_path / "out.jsonl")
    assert [r["messages"][-1]["content"] for r in records] == ["new answer", "A2", "A3", "A4"]
    assert [r["id"] for r in records] == ["same", "x", None, "42"]
    assert records[1]["title"] is None and records[2]["create_time"] is None
    assert "Traceback" not in capsys.readouterr().err


def test_preferences_on_a_long_linear_conversation_walk_to_the_root_only_for_rated_answers(tmp_path, monkeypatch):
    """2,400 exchanges in one branch: the prompt (a walk to the root) is built once, for the one rated answer,
    not once per exchange (which was quadratic: 94 s)."""
    from chatkit import conversion

    tree = Tree()
    parent = None
    for index in range(2400):
        parent = tree.chain(("user", f"Question {index}?"), ("assistant", f"Answer {index}."), parent=parent)
    rated = tree.mapping[parent]["message"]["id"]
    walks = []
    original = conversion.PreferenceWalk._prompt
    monkeypatch.setattr(conversion.PreferenceWalk, "_prompt", lambda self, node: walks.append(node) or
                        original(self, node))
    export = write_zip(tmp_path / "export.zip", {
        "conversations.json": [tree.conversation("long", current=parent)],
        "message_feedback.json": [{"message_id": rated, "rating": "thumbsUp"}]})
    assert run(export, tmp_path / "out.jsonl", "--preferences", tmp_path / "prefs.jsonl") == 0
    assert len(walks) == 1
    labelled = [json.loads(line) for line in (tmp_path / "prefs-labelled.jsonl").read_text().splitlines()]
    assert len(labelled) == 1 and labelled[0]["completion"][0]["content"] == "Answer 2399."
    assert len(labelled[0]["prompt"]) == 2 * 2400 - 1
