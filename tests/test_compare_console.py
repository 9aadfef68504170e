"""--compare in the console and with --query, and line editing with history on a real terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_replies

import demo_chatbot
from chatkit.chat import ChatSession, GenerationSettings, base_session
from chatkit.console import Console, side_by_side
from scripted_input import scripted

ROOT = Path(__file__).resolve().parent.parent
TAUGHT = "Hi there, friend!"


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tiny_llama):
    return train_replies(tmp_path_factory.mktemp("compare"), tiny_llama, {"Hello": TAUGHT}, "--report", "none")


def settings():
    return GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=1.0)


def test_console_compare_prints_both_answers_side_by_side(taught, monkeypatch):
    session = ChatSession(str(taught), settings=settings())
    base = base_session(session)
    assert base.model is session.model  # the same weights: no second model in memory
    expected_base = base.reply("Hello")
    base.reset()
    monkeypatch.setattr("shutil.get_terminal_size", lambda fallback=None: os.terminal_size((100, 24)))
    out = io.StringIO()
    assert Console(session, read=scripted(["Hello", "quit"]), out=out, base=base).run() == 0
    text = out.getvalue()
    header = next(line for line in text.splitlines() if line.startswith("Base model"))
    assert header.split("|")[1].strip() == "Trained"
    rows = text.split(header, 1)[1].splitlines()[2:]
    left = " ".join(r.split(" | ")[0].strip() for r in rows if " | " in r).strip()
    right = " ".join(r.split(" | ")[1].strip() for r in rows if " | " in r).strip()
    assert right == TAUGHT and " ".join(left.split()) == " ".join(expected_base.split())
    assert session.history[-1]["content"] == TAUGHT and base.history[-1]["content"] == expected_base


def test_query_compare_and_a_model_without_a_base(taught, tiny_llama, capsys):
    assert demo_chatbot.main([str(taught), "--query", "Hello", "--compare", "--temperature", "0",
                              "--max-new-tokens", "24", "--repetition-penalty", "1.0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[Base model]\n") and out.rstrip().endswith(f"[Trained]\n{TAUGHT}")
    assert demo_chatbot.main([str(tiny_llama), "--query", "Hello", "--compare"]) == 1
    err = capsys.readouterr().err
    assert "was not trained by this toolkit" in err and len(err.strip().splitlines()) == 1


def test_side_by_side_narrow_and_wide():
    wide = side_by_side(("A", "B"), ["one two three", "four"], 80).splitlines()
    assert wide[0].startswith("A ") and wide[0].endswith("| B") and wide[2].startswith("one two three")
    assert side_by_side(("A", "B"), ["x", "y"], 40) == "[A]\nx\n[B]\ny"


def read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    seen = b""
    deadline = time.time() + timeout
    while marker not in seen:
        assert time.time() < deadline, f"waited for {marker!r}, saw {seen[-300:]!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_arrow_keys_recall_earlier_messages_on_a_terminal(taught, tmp_path):
    """On a real terminal (a pseudo-terminal here), Up recalls the last message and history is kept."""
    env = dict(os.environ, CHATKIT_CACHE=str(tmp_path / "cache"), TERM="xterm", PYTHONIOENCODING="utf-8")
    main, child = pty.openpty()
    process = subprocess.Popen([sys.executable, str(ROOT / "demo_chatbot.py"), str(taught), "--temperature", "0",
                                "--max-new-tokens", "24", "--repetition-penalty", "1.0"],
                               stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    try:
        read_until(main, b"You: ")
        os.write(main, b"Hello\r")
        first = read_until(main, b"You: ")
        assert TAUGHT.encode() in first
        os.write(main, b"\x1b[A")  # the Up arrow
        recalled = read_until(main, b"Hello")
        os.write(main, b"\r")
        read_until(main, b"You: ")
        os.write(main, b"history\r")
        shown = read_until(main, b"You: ")
        assert shown.count(b"[user] Hello") == 2  # the recalled message was sent as typed
        os.write(main, b"quit\r")
        read_until(main, b"Bye.")
        assert process.wait(30) == 0
    finally:
        process.kill()
        os.close(main)
    assert b"Hello" in recalled
    history = (tmp_path / "cache" / "chat-history").read_text()
    assert history.splitlines()[-3:] == ["Hello", "history", "quit"]  # kept for the next chat (no repeats)
