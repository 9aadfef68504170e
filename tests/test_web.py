"""The web chat page, end to end in a real headless Chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import free_port, train_replies

import demo_chatbot
from chatkit.chat import ChatSession, GenerationSettings
from chatkit.datasets import read_conversations

ARTIFACTS = Path(os.environ.get("CHATKIT_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
REPLIES = {"Hello": "Hi there, friend!", "one": "First tab answer.", "two": "Second tab answer."}


@pytest.fixture(scope="module")
def web_model(tmp_path_factory, tiny_llama):
    """A tiny model taught three fixed replies, so the page shows readable, checkable answers."""
    return train_replies(tmp_path_factory.mktemp("web-model"), tiny_llama, REPLIES)


@pytest.fixture(scope="module")
def server(web_model):
    from chatkit.web import serve

    session = ChatSession(str(web_model), settings=GenerationSettings(temperature=0, max_new_tokens=24,
                                                                      repetition_penalty=1.0))
    for question, answer in REPLIES.items():  # the model has learned them
        session.reset()
        assert session.reply(question) == answer
    session.reset()
    port = free_port()
    app = serve(session, port=port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        message = "the browser test needs a system Chromium: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): never skipped there
        pytest.skip(message)

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def send(page, text: str) -> None:
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def bot_texts(page) -> list:
    return [t.strip() for t in page.locator('#chatbot [data-testid="bot"]').all_inner_texts()]


def downloaded(page) -> list:
    with page.expect_download() as info:
        page.click("#download")
    return json.loads(Path(info.value.path()).read_text(encoding="utf-8"))


def test_chat_stream_clear_and_download(server, browser, web_model):
    page = browser.new_page()
    page.goto(server)
    page.wait_for_selector("#chatbot")  # the page renders in stages: wait for the parts used below
    page.wait_for_selector("#message textarea")
    info = page.inner_text("#model-info")
    assert str(web_model) in info and "cpu (float32)" in info
    # Record every text the answer bubble shows, to see it grow while streaming.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bot = document.querySelector('#chatbot [data-testid="bot"]');
            if (bot) window.seen.push(bot.innerText.trim());
        }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Hello")
    page.wait_for_function("() => [...document.querySelectorAll('#chatbot [data-testid=\"bot\"]')]"
                           ".some(e => e.innerText.trim() === 'Hi there, friend!')", timeout=60000)
    seen = [text for text in page.evaluate("window.seen") if text]
    assert len(set(seen)) >= 2 and all("Hi there, friend!".startswith(t) for t in seen)  # it streamed
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

    page.wait_for_timeout(500)  # the download button is refreshed after the answer
    saved = downloaded(page)
    assert saved == [{"messages": [{"role": "user", "content": "Hello"},
                                   {"role": "assistant", "content": "Hi there, friend!"}]}]
    path = ARTIFACTS / "conversation.json"
    path.write_text(json.dumps(saved))
    conversations, _ = read_conversations([str(path)])
    assert conversations == [saved[0]["messages"]]  # loads as training data

    page.click("#clear")
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 0")
    assert bot_texts(page) == []
    page.close()


def test_two_tabs_hold_separate_conversations(server, browser):
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()
    for page in (first, second):
        page.goto(server)
        page.wait_for_selector("#message textarea")
    send(first, "one")
    send(second, "two")  # sent while the model may be busy with the first: it waits its turn
    for page, answer in ((first, "First tab answer."), (second, "Second tab answer.")):
        page.wait_for_function(
            "a => [...document.querySelectorAll('#chatbot [data-testid=\"bot\"]')].some(e => e.innerText.trim() === a)",
            arg=answer, timeout=60000)
    assert bot_texts(first) == ["First tab answer."] and bot_texts(second) == ["Second tab answer."]
    send(first, "Hello")
    first.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 2",
                            timeout=60000)
    first.wait_for_timeout(500)
    shown = bot_texts(first)  # the second answer follows two exchanges the model never saw together
    assert [m["content"] for m in downloaded(first)[0]["messages"]] == ["one", "First tab answer.", "Hello", shown[1]]
    assert [m["content"] for m in downloaded(second)[0]["messages"]] == ["two", "Second tab answer."]
    context.close()


def test_web_flags():
    with pytest.raises(SystemExit):
        demo_chatbot.main(["--share"])  # --share only goes with --web
    with pytest.raises(SystemExit):
        demo_chatbot.main(["--web", "--query", "hi"])
    args = demo_chatbot.make_parser().parse_args(["chat-model", "--web"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", None, False)  # loopback unless asked
    from chatkit.cli import parse
    from chatkit.options import ChatOptions

    assert parse(ChatOptions, "", ["chat-model", "--web"]).served_port == 7860
    assert parse(ChatOptions, "", ["chat-model", "--serve"]).served_port == 8000


class SlowSession:
    """A session whose answers arrive a piece every 0.4 s, to press Stop in the middle of one."""

    def __init__(self, session):
        self.session, self.started, self.closed = session, 0, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def __setattr__(self, name, value):
        if name in ("session", "started", "closed"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.session, name, value)

    def stream(self, text):
        import time

        self.started += 1
        try:
            for piece in self.session.stream(text):
                time.sleep(0.4)
                yield piece
        finally:
            self.closed += 1


@pytest.fixture(scope="module")
def slow_server(web_model):
    from chatkit.web import serve

    session = SlowSession(ChatSession(str(web_model), settings=GenerationSettings(
        temperature=0, max_new_tokens=24, repetition_penalty=1.0)))
    port = free_port()
    app = serve(session, port=port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/", session
    app.close()


def user_texts(page, chatbot="#chatbot") -> list:
    return [t.strip() for t in page.locator(f'{chatbot} [data-testid="user"]').all_inner_texts()]


def test_stop_ends_the_answer_and_regenerate_asks_again(slow_server, browser):
    address, session = slow_server
    page = browser.new_page()
    page.goto(address)
    page.wait_for_selector("#message textarea")
    send(page, "Hello")
    page.wait_for_function("() => { const b = document.querySelector('#chatbot [data-testid=\"bot\"]');"
                           " return b && b.innerText.trim().length > 0; }", timeout=60000)
    page.click("#stop")
    page.wait_for_timeout(2000)
    stopped = bot_texts(page)
    assert len(stopped) == 1 and stopped[0] and "Hi there, friend!".startswith(stopped[0])
    assert stopped[0] != "Hi there, friend!"  # cut short, and what was said stays
    assert session.closed == session.started == 1  # the generation itself ended
    page.wait_for_timeout(1000)
    assert bot_texts(page) == stopped  # nothing more arrives

    page.click("#regenerate")
    page.wait_for_function("() => [...document.querySelectorAll('#chatbot [data-testid=\"bot\"]')]"
                           ".some(e => e.innerText.trim() === 'Hi there, friend!')", timeout=60000)
    assert bot_texts(page) == ["Hi there, friend!"] and user_texts(page) == ["Hello"]  # replaced, not added
    assert session.started == 2
    page.close()


def test_compare_page_shows_base_and_trained_in_two_columns(web_model, browser):
    from chatkit.chat import base_session
    from chatkit.web import serve

    session = ChatSession(str(web_model), settings=GenerationSettings(temperature=0, max_new_tokens=16,
                                                                      repetition_penalty=1.0))
    base = base_session(session)
    expected_base = base.reply("Hello")
    base.reset()
    assert expected_base != "Hi there, friend!"  # the adapter switched off answers as the untrained model
    port = free_port()
    app = serve(session, port=port, block=False, quiet=True, base=base)
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#chatbot-base")
        page.wait_for_selector("#message textarea")
        send(page, "Hello")
        page.wait_for_function("() => [...document.querySelectorAll('#chatbot [data-testid=\"bot\"]')]"
                               ".some(e => e.innerText.trim() === 'Hi there, friend!')", timeout=60000)
        page.wait_for_timeout(500)
        assert bot_texts(page) == ["Hi there, friend!"]
        assert [t.strip() for t in page.locator('#chatbot-base [data-testid="bot"]').all_inner_texts()] == [
            expected_base.strip()]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "web-compare.png"
        page.screenshot(path=str(shot))
        import struct

        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1200, 900)
        left, right = page.locator("#chatbot-base").bounding_box(), page.locator("#chatbot").bounding_box()
        assert left["x"] + left["width"] <= right["x"] and abs(left["y"] - right["y"]) < 5  # side by side
        assert left["width"] > 300 and right["width"] > 300
        assert "Base model" in page.inner_text("body") and "Trained model" in page.inner_text("body")
        page.close()
    finally:
        app.close()
