"""What a user sees: the scripts print their stage lines and results, and no library noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Warning", "warn(", "{'loss'", "[transformers]", "gemm_4bit", "missing keys", "Loading weights", "\x1b[", "\r")


def run_script(script, *args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="default")  # warnings a user's Python would show
    env.pop("CHATKIT_DEBUG", None)
    env.pop("CHATKIT_VERBOSE", None)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_quiet(text):
    found = [noise for noise in NOISE if noise in text]
    assert not found, f"noise {found} in:\n{text}"


def test_training_and_a_query_print_only_what_the_user_needs(tmp_path, tiny_llama):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "What is the secret code?"},
                                              {"role": "assistant", "content": "The code is 4417."}]}] * 4))
    trained = run_script("train_chatgpt_model.py", "--data", data, "--model", tiny_llama, "--output",
                         tmp_path / "model", "--epochs", "2", "--rehearsal", "0", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout == ""  # stdout is kept for results
    assert_quiet(trained.stderr)
    lines = trained.stderr.splitlines()
    assert lines[0] == "read 4 conversations (4 in the messages format)"
    assert any(line.startswith("step ") and " elapsed" in line for line in lines)  # progress, as plain lines
    assert "Model saved in" in trained.stderr and len(lines) < 15
    answered = run_script("demo_chatbot.py", tmp_path / "model", "--query", "What is the secret code?",
                          "--max-new-tokens", "4", "--temperature", "0", cwd=tmp_path)
    assert answered.returncode == 0 and answered.stderr == ""
    assert len(answered.stdout.splitlines()) == 1
    assert "Report: " in trained.stderr and (tmp_path / "model" / "report.md").is_file()

    exported = run_script("export_model.py", tmp_path / "model", "--gguf", tmp_path / "m.gguf", "--ollama",
                          cwd=tmp_path)
    assert exported.returncode == 0 and exported.stdout == ""
    assert_quiet(exported.stderr)
    assert [line.split(" ")[0] for line in exported.stderr.splitlines()] == [
        "Exporting", "Wrote", "llama.cpp:", "Wrote"]


def hang_up_mid_answer(port: int) -> None:
    """Start a streamed answer, close the connection after its first event, then ask again."""
    import httpx

    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "stream": True, "max_tokens": 200,
            "temperature": 1.0}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    again = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] is not None


def test_the_api_server_says_one_line_and_stops_cleanly(tmp_path, tiny_llama):
    import signal
    import time
    import urllib.request

    from conftest import free_port

    port = free_port()
    env = dict(os.environ, PYTHONWARNINGS="default")
    env.pop("CHATKIT_VERBOSE", None)
    server = subprocess.Popen([sys.executable, str(ROOT / "demo_chatbot.py"), str(tiny_llama), "--serve", "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    assert json.load(response)["data"][0]["id"] == tiny_llama.name
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, server.stderr.read() if server.poll() else ""
                time.sleep(0.5)
        hang_up_mid_answer(port)  # a client that goes away leaves no traceback in the log
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert_quiet(err)
    lines = err.splitlines()
    assert lines[0] == "Loading the model..." and lines[1].startswith("Serving ") and "/v1" in lines[1]
    assert len(lines) <= 3 and out == ""


def test_gpt2_training_is_quiet_too(tmp_path, tiny_gpt2):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"user": "Hi", "bot": "Hello there"}, {"user": "Bye", "bot": "See you"}]))
    result = run_script("train_chatbot.py", "--model", tiny_gpt2, "--conversation_file", pairs, "--save_path",
                        tmp_path / "bot.pt", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_quiet(result.stderr + result.stdout)
    assert "Saved to" in result.stderr and (tmp_path / "bot.pt").is_file()


def test_verbose_shows_what_quiet_hides(tmp_path, tiny_gpt2):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"user": "Hi", "bot": "Hello there"}]))
    quiet = run_script("train_chatbot.py", "--model", tiny_gpt2, "--conversation_file", pairs, "--save_path",
                       tmp_path / "a.pt", cwd=tmp_path)
    loud = run_script("train_chatbot.py", "--model", tiny_gpt2, "--conversation_file", pairs, "--save_path",
                      tmp_path / "b.pt", "--verbose", cwd=tmp_path)
    assert quiet.returncode == loud.returncode == 0
    assert len(loud.stderr) > len(quiet.stderr)


def test_the_first_conversion_of_the_starter_model_says_one_line(tmp_path):
    env = dict(os.environ, CHATKIT_CACHE=str(tmp_path / "empty-cache"))
    env.pop("CHATKIT_VERBOSE", None)
    answered = subprocess.run([sys.executable, str(ROOT / "demo_chatbot.py"), "--query", "Hi", "--max-new-tokens", "2",
                               "--temperature", "0"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert answered.returncode == 0, answered.stderr
    assert answered.stderr.splitlines() == [
        "Converting SmolLM2-135M-Instruct.Q4_1.gguf to a cached model directory (once; about 20 s)..."]
    assert_quiet(answered.stderr)
    assert len(answered.stdout.splitlines()) == 1
