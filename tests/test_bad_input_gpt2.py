"""train_chatbot.py and gpt_generate.py on bad input: nothing replaced unasked, damaged files named as such."""

from __future__ import annotations

import json
import os

import pytest

import gpt_generate
import train_chatbot
from chatkit import models


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_gpt2):
    work = tmp_path_factory.mktemp("gpt2-bad")
    pairs = work / "pairs.json"
    pairs.write_text(json.dumps([{"user": "Hi", "bot": "Hello there"}]))
    assert train_chatbot.main(["--model", str(tiny_gpt2), "--conversation_file", str(pairs), "--save_path",
                               str(work / "bot.pt")]) == 0
    return work / "bot.pt"


def test_an_existing_save_path_needs_overwrite(tmp_path, tiny_gpt2, capsys, monkeypatch):
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes")
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"user": "Hi", "bot": "Hello"}]))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--model", str(tiny_gpt2), "--conversation_file", str(pairs), "--save_path", str(notes)]
    assert train_chatbot.main(argv) == 1
    assert "exists already; pass --overwrite" in capsys.readouterr().err and notes.read_text() == "my notes"


def test_a_missing_text_file_is_named_before_anything_loads(capsys):
    with pytest.raises(SystemExit) as info:
        train_chatbot.main(["--text_file", "no-such-file.txt"])
    assert info.value.code == 2 and "no-such-file.txt: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["cut", "empty", "garbage"])
def test_a_damaged_pt_is_called_damaged(saved, tmp_path, capsys, damage):
    data = saved.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes({"cut": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(100)}[damage])
    assert gpt_generate.main(["--model", str(broken), "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "could run code" not in err and len(err.splitlines()) == 1


def test_generate_usage_and_missing_files(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        gpt_generate.main(["--model", "x"])
    assert info.value.code == 2 and "give --prompt TEXT, or --chat" in capsys.readouterr().err
    assert gpt_generate.main(["--model", str(tmp_path / "gone.pt"), "--prompt", "Hi"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
