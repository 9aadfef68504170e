"""demo_chatbot.py on bad input and faults: Ctrl-C, broken text, closed input, busy ports, damaged models."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import demo_chatbot as cli
import train_chatgpt_model
from chatkit.chat import ChatSession, GenerationSettings
from scripted_input import scripted
from chatkit.console import Console

ROOT = Path(__file__).resolve().parent.parent
LONG = GenerationSettings(temperature=0, max_new_tokens=40, repetition_penalty=1.0)


class InterruptingOutput(io.StringIO):
    """Console output that presses Ctrl-C once, at the first piece of the first answer."""

    def __init__(self):
        super().__init__()
        self.pieces = 0
        self.sent = False

    def write(self, text):
        if self.getvalue().count("Bot: ") == 1 and text and "Bot:" not in text:
            self.pieces += 1
            if self.pieces == 1 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


@pytest.fixture()
def ctrl_c_raises():
    """Python's own Ctrl-C (KeyboardInterrupt), even where the suite runs as a background job, which
    starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(tiny_llama, ctrl_c_raises):
    session = ChatSession(str(tiny_llama), settings=LONG)
    out = InterruptingOutput()
    before = set(threading.enumerate())
    assert Console(session, read=scripted(["Tell me a long story", "Hello", "quit"]), out=out).run() == 0
    text = out.getvalue()
    assert "(Stopped. Ctrl-C at the prompt, or quit, ends the chat.)" in text
    assert text.count("Bot: ") == 2 and text.rstrip().endswith("Bye.")  # the next message was answered
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert len(session.history[1]["content"]) < 200  # the stopped answer, cut short, is kept
    assert not set(threading.enumerate()) - before  # the generation thread ended


def test_an_undecodable_line_is_skipped_and_the_chat_goes_on(tiny_llama):
    session = ChatSession(str(tiny_llama), settings=GenerationSettings(temperature=0, max_new_tokens=4))
    out = io.StringIO()
    bad = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert Console(session, read=scripted([bad, "Hello"]), out=out).run() == 0
    assert "not valid UTF-8 text and was skipped" in out.getvalue() and out.getvalue().count("Bot: ") == 1


def test_non_utf8_bytes_on_stdin_and_a_closed_stdin(tiny_llama):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    piped = subprocess.run([sys.executable, str(ROOT / "demo_chatbot.py"), str(tiny_llama), "--max-new-tokens", "4"],
                           input=b"caf\xe9 \xff\nHello\n", capture_output=True, env=env, timeout=120)
    assert piped.returncode == 0 and b"Traceback" not in piped.stderr
    assert piped.stdout.count(b"Bot: ") == 2 and piped.stdout.rstrip().endswith(b"Bye.")  # both lines answered
    closed = subprocess.run(["bash", "-c", f'"{sys.executable}" "{ROOT / "demo_chatbot.py"}" "{tiny_llama}" <&-'],
                            capture_output=True, env=env, timeout=120)
    assert closed.returncode == 0 and b"Traceback" not in closed.stderr and closed.stdout.rstrip().endswith(b"Bye.")


def test_a_broken_character_in_a_query_is_answered(tiny_llama, capsys):
    assert cli.main([str(tiny_llama), "--query", "caf\udcff?", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and err == ""


def test_query_from_a_missing_stdin(tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    assert cli.main([str(tiny_llama), "--query", "-"]) == 1
    assert "no standard input" in capsys.readouterr().err


def test_save_onto_a_folder_is_an_error_line_and_leaves_nothing(tiny_llama, tmp_path):
    session = ChatSession(str(tiny_llama), settings=GenerationSettings(temperature=0, max_new_tokens=4))
    out = io.StringIO()
    Console(session, read=scripted(["Hello", f"/save {tmp_path}", "quit"]), out=out).run()
    assert f"error: {tmp_path} is a folder" in out.getvalue()
    assert os.listdir(tmp_path) == []


def test_save_onto_an_existing_file_keeps_it_unless_asked(tiny_llama, tmp_path, monkeypatch):
    """A training file of 50 conversations is not replaced by one chat; /save! replaces it; ~ is home."""
    monkeypatch.setenv("HOME", str(tmp_path))
    training = tmp_path / "train.json"
    training.write_text(json.dumps([{"messages": [{"role": "user", "content": str(i)}]} for i in range(50)]))
    session = ChatSession(str(tiny_llama), settings=GenerationSettings(temperature=0, max_new_tokens=4))
    out = io.StringIO()
    Console(session, read=scripted(["Hello", "/save ~/train.json", "/save ~/new.json", "quit"]), out=out).run()
    assert "exists already and was kept" in out.getvalue() and "/save!" in out.getvalue()
    assert len(json.loads(training.read_text())) == 50
    assert len(json.loads((tmp_path / "new.json").read_text())) == 1
    Console(session, read=scripted(["/save! ~/train.json", "quit"]), out=io.StringIO()).run()
    assert len(json.loads(training.read_text())) == 1


def test_an_empty_query_is_an_error(tiny_llama, capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli.main([str(tiny_llama), "--query", "  "])
    assert exit_code.value.code == 2 and "--query is empty" in capsys.readouterr().err


def test_web_on_a_busy_port_fails_before_loading(tiny_llama, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main([str(tiny_llama), "--web", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot serve on 127.0.0.1:{port}" in err and "--port" in err
    assert "Serving" not in err and "Loading the model" not in err


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    work = tmp_path_factory.mktemp("adapter")
    data = work / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]}]))
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output",
                                     str(work / "model"), "--epochs", "1", "--rehearsal", "0"]) == 0
    return work / "model"


@pytest.mark.parametrize("config, fragment", [
    (lambda text: text[: len(text) // 2], "adapter_config.json is damaged"),
    (lambda text: json.dumps(dict(json.loads(text), r="sixteen")), "'r' should be a number, not 'sixteen'"),
])
def test_a_damaged_adapter_is_one_line(adapter, tmp_path, capsys, config, fragment):
    import shutil

    damaged = tmp_path / "model"
    shutil.copytree(adapter, damaged)
    file = damaged / "adapter_config.json"
    file.write_text(config(file.read_text()))
    assert cli.main([str(damaged), "--query", "Hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1"], "--temperature must not be negative"),
    (["--top-p", "0"], "--top-p must be above 0 and at most 1"),
    (["--port", "99999", "--web"], "--port must be 1-65535"),
    (["--query", "x", "--web"], "--web and --query: choose one"),
    (["--host", "0.0.0.0"], "--host and --port go with --web or --serve"),
    (["m1", "--model", "m2"], "give model once"),
])
def test_bad_flags_are_usage_errors(capsys, flags, fragment):
    with pytest.raises(SystemExit) as info:
        cli.main(flags)
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_sigterm_during_an_answer_ends_the_chat(tiny_llama, monkeypatch, capsys):
    """Ctrl-C stops an answer and the chat goes on; SIGTERM (kill, a closing terminal) ends the chat."""
    import builtins

    from chatkit.chat import ChatSession as Session

    typed = iter(["Hello", "Hello again", "quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    streamed = []

    def stream(self, text):
        streamed.append(text)
        yield "Hi"
        os.kill(os.getpid(), signal.SIGTERM)
        yield " there"

    monkeypatch.setattr(Session, "stream", stream)
    assert cli.main([str(tiny_llama)]) == 143
    assert streamed == ["Hello"]  # the chat did not go on to the next message
    assert capsys.readouterr().err.strip().endswith("terminated")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
