"""A web chat page for a model (Gradio), over the same ChatSession the console uses.

Each browser tab holds its own conversation (Gradio keeps component values per session); the model
is shared, and Gradio's queue runs one generation at a time, so a request made while the model is
busy waits its turn. The prompt is rebuilt from the tab's conversation on every message with the
model's trained formatting; the session's key/value cache is reused where the prompts share a prefix.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from typing import List, Optional

from .chat import ChatSession
from .errors import ChatkitError
from .files import write_json

DOWNLOAD_NAME = "conversation.json"


def _messages(history: list) -> List[dict]:
    """Gradio's chat history (messages format) as plain {"role", "content"} text messages."""
    out = []
    for item in history or []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list):  # Gradio 6 may hold [{"type": "text", "text": ...}]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if isinstance(content, str) and item.get("role") in ("user", "assistant"):
            out.append({"role": item["role"], "content": content})
    return out


def _responder(sessions: List[ChatSession], gr):
    """The handler that streams answers into the tab's conversations (one per session), with the page's settings.

    With --compare there are two sessions, the base model and the trained one: each column keeps its own
    conversation, and the base answers first."""
    def respond(message: str, *values):
        histories = [list(h or []) for h in values[:len(sessions)]]
        temperature, max_new_tokens, system_prompt = values[len(sessions):]
        if not message or not message.strip():
            yield (*histories, "")
            return
        for index, session in enumerate(sessions):
            session.settings.temperature = float(temperature)
            session.settings.max_new_tokens = int(max_new_tokens)
            session.system_prompt = system_prompt.strip() or None
            session.history = _messages(histories[index])
            histories[index] = histories[index] + [{"role": "user", "content": message},
                                                   {"role": "assistant", "content": ""}]
            answer = ""
            pieces = session.stream(message)
            try:
                for piece in pieces:
                    answer += piece
                    histories[index][-1] = {"role": "assistant", "content": answer}
                    yield (*histories, "")
            except ChatkitError as exc:
                raise gr.Error(str(exc))
            finally:
                pieces.close()  # Stop closes this handler: generation ends at the next token
            histories[index][-1] = {"role": "assistant", "content": session.history[-1]["content"]}
            yield (*histories, "")

    return respond


def _regenerator(respond, count: int):
    """The handler that answers the last message again: its answers are dropped, then asked anew."""
    def regenerate(*values):
        histories = [list(h or []) for h in values[:count]]
        users = [i for i, item in enumerate(histories[-1]) if isinstance(item, dict) and item.get("role") == "user"]
        if not users:
            yield (*histories, "")
            return
        message = _messages([histories[-1][users[-1]]])[0]["content"]
        trimmed = [h[:max(i for i, item in enumerate(h) if isinstance(item, dict) and item.get("role") == "user")]
                   for h in histories]
        yield from respond(message, *trimmed, *values[count:])

    return regenerate


def _downloader(download_dir: str):
    """The handler that writes the tab's conversation in the training `messages` format for download."""
    def conversation_file(history: list, system_prompt: str, request=None):
        messages = _messages(history)
        if system_prompt and system_prompt.strip():
            messages.insert(0, {"role": "system", "content": system_prompt.strip()})
        folder = os.path.join(download_dir, getattr(request, "session_hash", None) or "shared")
        path = os.path.join(folder, DOWNLOAD_NAME)
        write_json(path, [{"messages": messages}])
        return path

    return conversation_file


def build_app(session: ChatSession, base: Optional[ChatSession] = None):
    """The Gradio Blocks app for one loaded model (and, with --compare, its base model beside it)."""
    try:
        import gradio as gr
    except ImportError:
        raise ChatkitError("the web page needs gradio: pip install gradio (the console chat does not)") from None

    sessions = [base, session] if base is not None else [session]
    respond = _responder(sessions, gr)
    regenerate = _regenerator(respond, len(sessions))
    download_dir = tempfile.mkdtemp(prefix="chatkit-web-")
    atexit.register(shutil.rmtree, download_dir, ignore_errors=True)
    downloader = _downloader(download_dir)

    def conversation_file(history: list, system_prompt: str, request: gr.Request):
        return downloader(history, system_prompt, request)

    with gr.Blocks(title=f"chatkit: {session.source.spec}") as app:
        heading = "Comparing the base model (left) with" if base is not None else "Chatting with"
        gr.Markdown(f"### {heading} `{session.source.describe()}`\nRunning on **{session.device_description()}**.",
                    elem_id="model-info")
        if base is None:
            chatbots = [gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)]
        else:
            with gr.Row():
                chatbots = [gr.Chatbot(label="Base model (adapter off)", elem_id="chatbot-base", height=420),
                            gr.Chatbot(label="Trained model", elem_id="chatbot", height=420)]
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="message",
                             autofocus=True)
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            stop = gr.Button("Stop", elem_id="stop")
            retry = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
            download = gr.DownloadButton("Download conversation (JSON)", value=None, elem_id="download")
        with gr.Accordion("Settings", open=False):
            temperature = gr.Slider(0.0, 2.0, value=session.settings.temperature, step=0.05,
                                    label="Temperature (0 = always the likeliest word)", elem_id="temperature")
            max_new_tokens = gr.Slider(8, 1024, value=session.settings.max_new_tokens, step=8,
                                       label="Max new tokens", elem_id="max-new-tokens")
            system_prompt = gr.Textbox(value=session.system_prompt or "", label="System prompt",
                                       elem_id="system-prompt")
        settings = [temperature, max_new_tokens, system_prompt]
        answers = []
        for trigger, handler, inputs in ((message.submit, respond, [message]), (send.click, respond, [message]),
                                         (retry.click, regenerate, [])):
            event = trigger(handler, inputs + chatbots + settings, chatbots + [message])
            answers.append(event)
            event.then(conversation_file, [chatbots[-1], system_prompt], download)
        # Stop ends the answer at the next token; what was said so far stays in the conversation.
        stop.click(None, None, None, cancels=answers, queue=False)
        clear.click(lambda: (*([] for _ in chatbots), None), None, chatbots + [download], queue=False)
    # One generation at a time: the model is shared; later requests wait in the queue.
    app.queue(default_concurrency_limit=1)
    return app


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be served on (a port in use, say)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        raise ChatkitError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); another program may be using "
                           f"the port: pass another --port, e.g. --port {port + 1}") from None


def serve(session: ChatSession, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          block: bool = True, quiet: bool = False, base: Optional[ChatSession] = None):
    """Start the page; returns the Gradio app (and, with block=False, leaves it running in the background)."""
    app = build_app(session, base)
    if host not in ("127.0.0.1", "localhost", "::1") and not quiet:
        print(f"warning: serving on {host}: anyone who can reach this machine can use the model",
              file=sys.stderr, flush=True)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
               show_error=True)
    return app
