"""demo_chatbot.py and the ChatSession: scripted console transcripts, --query, trimming, formatting, /save."""

from __future__ import annotations

import io
import json

import pytest

import demo_chatbot as cli
from chatkit import formatting
from chatkit.chat import ChatSession, GenerationSettings
from scripted_input import scripted
from chatkit.console import HELP, Console
from chatkit.datasets import read_conversations

GREEDY = GenerationSettings(temperature=0, max_new_tokens=8, repetition_penalty=1.0)


def streamed(session, text):
    return "".join(session.stream(text))


def test_console_transcript_and_every_command(tiny_llama, tmp_path):
    saved = tmp_path / "chat.json"
    reference = ChatSession(str(tiny_llama), settings=GREEDY, reuse_cache=False)
    first, second = streamed(reference, "Hello"), streamed(reference, "More")
    first_kept, second_kept = reference.history[1]["content"], reference.history[3]["content"]
    after_clear = streamed(ChatSession(str(tiny_llama), settings=GREEDY, system_prompt="Be terse."), "Again")

    session = ChatSession(str(tiny_llama), settings=GREEDY)
    out = io.StringIO()
    code = Console(session, read=scripted([
        "Hello", "", "   ", "More", "history", f"/save {saved}", "/system Be terse.", "history", "Again",
        "/help", "/nope", "clear", "history", "quit", "never read",
    ]), out=out).run()
    assert code == 0
    assert out.getvalue() == "\n".join([
        f"Chatting with {session.describe()}",
        "Type a message and press Enter. Commands: quit, exit, clear, history, /save FILE, /system TEXT, /help",
        f"Bot: {first}",
        f"Bot: {second}",
        "[user] Hello", f"[assistant] {first_kept}", "[user] More", f"[assistant] {second_kept}",
        f"(Saved 4 messages to {saved}.)",
        "(System prompt set; conversation cleared.)",
        "[system] Be terse.", "(No conversation yet.)",
        f"Bot: {after_clear}",
        HELP,
        "Unknown command /nope; /help lists them.",
        "(Conversation cleared.)",
        "[system] Be terse.", "(No conversation yet.)",
        "Bye.",
        "",
    ])
    conversations, _ = read_conversations([str(saved)])  # /save writes loadable training data
    assert conversations == [[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first_kept},
                              {"role": "user", "content": "More"}, {"role": "assistant", "content": second_kept}]]


def test_ctrl_d_and_ctrl_c_end_cleanly(tiny_llama):
    session = ChatSession(str(tiny_llama), settings=GREEDY)
    out = io.StringIO()
    assert Console(session, read=scripted([]), out=out).run() == 0
    assert out.getvalue().endswith("/help\n\nBye.\n")

    def interrupt(prompt):
        raise KeyboardInterrupt

    out = io.StringIO()
    assert Console(session, read=interrupt, out=out).run() == 0
    assert out.getvalue().endswith("\nBye.\n")


def test_multiline_paste(tiny_llama):
    session = ChatSession(str(tiny_llama), settings=GREEDY)
    Console(session, read=scripted(['"""', "line one", "", "line three", '"""', "quit"]), out=io.StringIO()).run()
    assert session.history[0] == {"role": "user", "content": "line one\n\nline three"}


def test_query_prints_exactly_one_answer(tiny_llama, capsys):
    expected = ChatSession(str(tiny_llama), settings=GREEDY).reply("What is AI?")
    assert cli.main([str(tiny_llama), "--query", "What is AI?", "--temperature", "0", "--max-tokens", "8",
                     "--repetition-penalty", "1.0"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_query_from_stdin(tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is AI?\n"))
    assert cli.main([str(tiny_llama), "--query", "-", "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_history_is_trimmed_by_whole_exchanges(tiny_llama):
    notices = []
    session = ChatSession(str(tiny_llama), settings=GREEDY, system_prompt="Sys", max_context=80)
    session.on_notice = notices.append
    for number in range(6):
        session.reply(f"message number {number}")
    assert len(notices) == 1  # told once
    assert session.history[0]["role"] == "user" and session.history[-1]["role"] == "assistant"
    assert session.history[-2]["content"] == "message number 5"
    assert len(session.history) < 12
    assert session.messages()[0] == {"role": "system", "content": "Sys"}
    prompt = session.prompt_ids("next")
    assert len(prompt) <= 80 - GREEDY.max_new_tokens


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_prompt_is_rendered_exactly_as_in_training(fixture, request):
    path = request.getfixturevalue(fixture)
    session = ChatSession(str(path), settings=GREEDY, system_prompt="Be kind.")
    session.history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    messages = session.messages("How are you?")
    training_ids, _ = formatting.tokenize_conversation(messages + [{"role": "assistant", "content": "Fine."}],
                                                       session.tokenizer)
    prompt = session.prompt_ids("How are you?")
    assert training_ids[: len(prompt)] == prompt  # the chat prompt is a prefix of the training text
    assert session.tokenizer.decode(prompt) == formatting.render(messages, session.tokenizer, add_generation_prompt=True)


def test_cache_reuse_gives_the_same_answers(tiny_llama):
    with_cache = ChatSession(str(tiny_llama), settings=GREEDY)
    without = ChatSession(str(tiny_llama), settings=GREEDY, reuse_cache=False)
    for text in ("one", "two", "three"):
        assert with_cache.reply(text) == without.reply(text)
    assert with_cache._cache is not None and without._cache is None


def test_trained_model_uses_its_saved_system_prompt(tiny_llama, tmp_path):
    import train_chatgpt_model

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]))
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(tmp_path / "m"),
                                     "--epochs", "1", "--system-prompt", "You are Ada."]) == 0
    session = ChatSession(str(tmp_path / "m"), settings=GREEDY)
    assert session.source.kind == "adapter"
    assert session.messages("hi")[0] == {"role": "system", "content": "You are Ada."}


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--max-new-tokens", "0"])
    assert info.value.code == 2
    assert cli.main(["./no/such/model"]) == 1
    assert "error: --model ./no/such/model: no such file or directory" in capsys.readouterr().err


def test_a_long_history_is_trimmed_in_a_few_renders(tiny_llama, monkeypatch):
    """5,000 short messages: the exchanges that fit are found by halving, not one render per dropped exchange."""
    import chatkit.history as chat  # where the prompt is rendered

    session = ChatSession(str(tiny_llama), settings=GREEDY, max_context=200)
    session.history = [m for i in range(2500) for m in ({"role": "user", "content": f"q{i}"},
                                                        {"role": "assistant", "content": f"a{i}"})]
    renders = []
    original = chat.encode_prompt
    monkeypatch.setattr(chat, "encode_prompt", lambda *a, **k: renders.append(1) or original(*a, **k))
    ids = session.prompt_ids("last")
    assert len(renders) <= 2 * 13 + 2  # log2(2500) halvings, twice at most, and the final prompt
    assert len(ids) <= 200 - session.new_tokens
    kept = len(session.history) // 2
    assert 0 < kept < 2500 and session.history[-1]["content"] == "a2499"  # the newest exchanges stay
    # one exchange more would not have fitted
    session.history = [{"role": "user", "content": f"q{2499 - kept}"},
                       {"role": "assistant", "content": f"a{2499 - kept}"}] + session.history
    assert len(original(session.prompt_messages("last"), session.tokenizer)) > 200 - session.new_tokens
