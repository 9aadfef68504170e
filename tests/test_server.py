"""The OpenAI-compatible API (`demo_chatbot.py --serve`), driven by the official `openai` client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from conftest import free_port, train_replies

import demo_chatbot
from chatkit.chat import ChatSession, GenerationSettings
from chatkit.server import StopScanner, build_app

REPLIES = {"Hello": "Hi there, friend!", "What is the secret code?": "The secret code is 4417."}


@pytest.fixture(scope="module")
def taught(tmp_path_factory, tiny_llama):
    """A tiny model taught two fixed replies."""
    return train_replies(tmp_path_factory.mktemp("served"), tiny_llama, REPLIES, "--report", "none")


def start(session, queue: int = 8):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(session, "m", queue), host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def api(taught):
    session = ChatSession(str(taught), settings=GenerationSettings(temperature=0, max_new_tokens=24,
                                                                   repetition_penalty=1.0))
    server, thread, address = start(session)
    yield address
    server.should_exit = True
    thread.join()


def client(address: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{address}/v1", api_key="unused", max_retries=0)


def test_models_and_plain_and_streamed_answers_match_the_toolkit(api, taught):
    assert [m.id for m in client(api).models.list().data] == ["m"]
    expected = ChatSession(str(taught), settings=GenerationSettings(temperature=0, max_new_tokens=24)).reply("Hello")
    assert expected == REPLIES["Hello"]
    plain = client(api).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}],
                                                temperature=0)
    assert plain.choices[0].message.content == expected and plain.choices[0].finish_reason == "stop"
    assert plain.object == "chat.completion" and plain.model == "m"
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 3
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client(api).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hello"}], temperature=0, stream=True,
        stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) >= 2  # streamed in pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_raw_stream_is_server_sent_events_ending_with_done(api):
    with httpx.stream("POST", f"{api}/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "Hello"}], "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_history_system_prompt_max_tokens_and_stop(api):
    answer = client(api).chat.completions.create(model="anything", temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there, friend!"},
        {"role": "user", "content": [{"type": "text", "text": "What is the secret code?"}]}])
    assert answer.choices[0].message.content  # a history and text parts are accepted
    short = client(api).chat.completions.create(model="m", temperature=0, max_tokens=2,
                                                messages=[{"role": "user", "content": "Hello"}])
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    cut = client(api).chat.completions.create(model="m", temperature=0, stop=["friend"],
                                              messages=[{"role": "user", "content": "Hello"}])
    assert cut.choices[0].message.content == "Hi there," and cut.choices[0].finish_reason == "stop"
    streamed = client(api).chat.completions.create(model="m", temperature=0, stop="friend", stream=True,
                                                   messages=[{"role": "user", "content": "Hello"}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Hi there,"


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
])
def test_bad_requests_get_openai_errors(api, body, param):
    response = httpx.post(f"{api}/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_not_json_unknown_paths_and_methods_and_too_long(api):
    response = httpx.post(f"{api}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.get(f"{api}/v1/engines")
    assert response.status_code == 404 and "/v1/chat/completions" in response.json()["error"]["message"]
    response = httpx.get(f"{api}/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client(api).chat.completions.create(model="m", messages=[{"role": "user", "content": "tea " * 400}])
    assert caught.value.body["code"] == "context_length_exceeded"


def test_queue_is_bounded_and_requests_take_turns(taught):
    session = ChatSession(str(taught), settings=GenerationSettings(temperature=0, max_new_tokens=24))
    original = session.stream
    release = threading.Event()

    def held_stream(text):  # the first answer waits until released, holding the model
        for piece in original(text):
            release.wait(30)
            yield piece

    session.stream = held_stream
    server, thread, address = start(session, queue=1)
    try:
        results = []
        first = threading.Thread(target=lambda: results.append(client(address).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hello"}])))
        second = threading.Thread(target=lambda: results.append(client(address).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "What is the secret code?"}])))
        first.start()
        time.sleep(0.5)
        second.start()  # waits its turn: the queue holds one
        time.sleep(0.5)
        third = httpx.post(f"{address}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}]})
        assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_exceeded"
        release.set()
        first.join(60)
        second.join(60)
        assert sorted(r.choices[0].message.content for r in results) == sorted(REPLIES.values())
        again = client(address).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}])
        assert again.choices[0].message.content == REPLIES["Hello"]  # the places were given back
    finally:
        release.set()
        server.should_exit = True
        thread.join()


def test_stop_scanner_holds_back_a_possible_stop():
    scanner = StopScanner(["END"])
    assert scanner.feed("abc E") == "abc" and scanner.feed("N") == "" and scanner.feed("x") == " ENx"
    assert scanner.feed(" then EN") == " then" and scanner.feed("D more") == "" and scanner.stopped


def test_serve_flags():
    args = demo_chatbot.make_parser().parse_args(["chat-model", "--serve"])
    assert args.serve and args.port is None and args.host == "127.0.0.1"
    for bad in (["--serve", "--web"], ["--serve", "--query", "hi"], ["--queue", "3"], ["--port", "9000"]):
        with pytest.raises(SystemExit):
            demo_chatbot.main(bad)


@pytest.fixture(scope="module")
def guarded(taught):
    """The API as --serve starts it on the loopback address: Host checked, an API key required."""
    import uvicorn

    from chatkit.server import allowed_hosts

    session = ChatSession(str(taught), settings=GenerationSettings(temperature=0, max_new_tokens=8))
    port = free_port()
    app = build_app(session, "m", hosts=allowed_hosts("127.0.0.1", port), api_key="s3cret")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join()


HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


@pytest.mark.parametrize("headers, status, code", [
    ({"Host": "evil.example"}, 421, "misdirected_request"),  # DNS rebinding: a page's own name, pointed here
    ({"Origin": "http://evil.example"}, 403, "cross_site_request"),  # a page the user visits, posting here
    ({"Origin": "null"}, 403, "cross_site_request"),
    ({"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ({"Authorization": ""}, 401, "invalid_api_key"),  # no key at all
    ({"Authorization": "Basic s3cret"}, 401, "invalid_api_key"),  # the key, but not as a bearer token
    ({"Authorization": "Bearer s3cret2"}, 401, "invalid_api_key"),
])
def test_a_web_page_or_a_stranger_can_neither_run_nor_read_the_model(guarded, headers, status, code):
    address, port = guarded
    sent = {"Authorization": "Bearer s3cret"} | headers
    response = httpx.post(f"{address}/v1/chat/completions", json=HELLO, headers={k: v for k, v in sent.items() if v})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code and "Hello" not in response.text


def test_a_form_post_without_json_content_type_is_refused(guarded):
    """A page may send text/plain to any address without asking first: such a body is never parsed."""
    address, _ = guarded
    response = httpx.post(f"{address}/v1/chat/completions", content=json.dumps(HELLO),
                          headers={"Authorization": "Bearer s3cret", "Content-Type": "text/plain"})
    assert response.status_code == 415 and response.json()["error"]["message"].endswith("application/json")


@pytest.mark.parametrize("authorization, content_type", [("bearer s3cret", "Application/JSON"),
                                                          ("BEARER  s3cret", "application/json; charset=UTF-8")])
def test_the_auth_scheme_and_the_media_type_are_read_case_insensitively(guarded, authorization, content_type):
    address, _ = guarded
    response = httpx.post(f"{address}/v1/chat/completions", content=json.dumps(HELLO),
                          headers={"Authorization": authorization, "Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert REPLIES["Hello"].startswith(response.json()["choices"][0]["message"]["content"])


def test_its_own_user_with_the_key_is_answered(guarded):
    address, port = guarded
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        response = httpx.post(f"{address}/v1/chat/completions", json=HELLO | {"n": None, "seed": 2**70, "user": "me"},
                              headers={"Authorization": "Bearer s3cret", "Host": host,
                                       "Origin": f"http://{host}"})
        assert response.status_code == 200, response.text
        answer = response.json()["choices"][0]["message"]["content"]
        assert answer and REPLIES["Hello"].startswith(answer)  # the taught reply, up to 8 tokens
    api = openai.OpenAI(base_url=f"{address}/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in api.models.list().data] == ["m"]


def test_a_deeply_nested_body_is_a_400(api):
    body = b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    response = httpx.post(f"{api}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]


def test_allowed_hosts():
    from chatkit.server import allowed_hosts

    assert allowed_hosts("127.0.0.1", 8000) == {"127.0.0.1:8000", "localhost:8000", "::1:8000", "[::1]:8000"}
    assert allowed_hosts("0.0.0.0", 8000) is None  # every address: the API key is what protects it
    assert allowed_hosts("192.168.1.5", 80) == {"192.168.1.5:80", "192.168.1.5"}


@pytest.mark.parametrize("field, value", [("logprobs", True), ("top_logprobs", 3),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("tool_choice", "required"), ("response_format", {"type": "json_object"}),
                                          ("logit_bias", {"50": 10})])
def test_fields_this_server_does_not_serve_are_a_400_naming_them(api, field, value):
    response = httpx.post(f"{api}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "Hello"}], field: value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and f"'{field}' is not supported by this server" in error["message"]


def test_the_same_fields_left_at_their_defaults_are_answered(api):
    answer = client(api).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}],
                                                 logprobs=False, tools=[], tool_choice="none",
                                                 response_format={"type": "text"}, temperature=0)
    assert answer.choices[0].message.content == REPLIES["Hello"]


def test_a_body_that_never_arrives_or_is_cut_off_is_answered_and_logs_no_traceback(api, monkeypatch):
    """A chunk announced as 2 GB and never sent holds the connection BODY_SECONDS at most (408); a client
    hanging up mid-body leaves no traceback in the server's log."""
    import logging
    import socket
    from urllib.parse import urlparse

    from chatkit import server

    monkeypatch.setattr(server, "BODY_SECONDS", 1.0)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    address = urlparse(api)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n7FFFFFFF\r\n{\"mess").encode()
    try:
        with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
            connection.sendall(head)
            answer = ""
            while not answer.endswith("}}"):
                answer += connection.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive whole within 1 s" in answer
        with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
            connection.sendall(head)  # and hangs up
        time.sleep(0.5)
        assert client(api).models.list().data[0].id == "m"
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not [record for record in records if record.exc_info], [record.getMessage() for record in records]


def test_a_message_of_megabytes_is_refused_without_tokenizing_it(api):
    words = "word " * 1_500_000  # 7.5 MB: inside the body limit, far past any context
    response = httpx.post(f"{api}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": words}], "max_tokens": 5})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["message"].startswith("the message is 7,500,000 characters, more than this model's context of")


def test_long_stop_strings_and_huge_bodies_are_refused_and_a_long_stop_is_cheap(api):
    response = httpx.post(f"{api}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}],
                                                              "stop": ["x" * 150_000] * 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"
    assert "at most 1,000 characters" in response.json()["error"]["message"]
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (9 << 20) + b'"}]}'
    response = httpx.post(f"{api}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "over 8 MB" in response.json()["error"]["message"]
    # the scanner looks back only as far as the text it holds: a piece at a time, never the whole stop string
    scanner = StopScanner(["ab" * 500])
    assert scanner.feed("hello a") == "hello" and scanner.pending == " a"
    assert scanner.feed("b" + "ab" * 498 + "a") == "" and scanner.feed("b!") == "" and scanner.stopped


def test_clients_that_hang_up_at_once_leave_the_server_answering(taught):
    """Streaming clients that close right after sending, then another request at once, many times: every
    answer is right and the queue's places come back (queue 0: a place not given back is a 429)."""
    session = ChatSession(str(taught), settings=GenerationSettings(temperature=0, max_new_tokens=24,
                                                                   repetition_penalty=1.0))
    server, thread, address = start(session, queue=0)
    try:
        for _ in range(6):
            with httpx.Client() as hasty:
                with hasty.stream("POST", f"{address}/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "Hello"}], "stream": True}):
                    pass  # hung up before reading anything
            for _ in range(50):  # the hung-up answer may still be ending: a 429 until its place is back
                response = httpx.post(f"{address}/v1/chat/completions", timeout=60,
                                      json={"messages": [{"role": "user", "content": "What is the secret code?"}],
                                            "temperature": 0})
                if response.status_code != 429:
                    break
                time.sleep(0.1)
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == REPLIES["What is the secret code?"]
    finally:
        server.should_exit = True
        thread.join()


def test_an_ipv6_host_in_brackets_and_a_blank_key(monkeypatch, capsys):
    import socket

    from chatkit.web import check_port

    assert demo_chatbot.bare_host("[::1]") == "::1" and demo_chatbot.url_host("::1") == "[::1]"
    assert demo_chatbot.bare_host("127.0.0.1") == "127.0.0.1"
    if socket.has_ipv6:
        try:
            check_port("::1", free_port())
        except Exception as exc:  # a machine without an IPv6 loopback says so in one line
            assert "cannot serve on ::1" in str(exc)
    monkeypatch.setenv("CHATKIT_API_KEY", "   ")
    assert demo_chatbot.main(["no-such-model", "--serve"]) == 1
    assert "CHATKIT_API_KEY holds only spaces" in capsys.readouterr().err
