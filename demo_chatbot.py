#!/usr/bin/env python3
"""Talk to a chat model in the console, or ask it one question.

Examples:
    python demo_chatbot.py chat-model
    python demo_chatbot.py chat-model --query "What is AI?"
    echo "What is AI?" | python demo_chatbot.py chat-model --query -
    python demo_chatbot.py smollm2-135m --temperature 0 --max-new-tokens 100
    python demo_chatbot.py ./model.gguf --system-prompt "You are a pirate."
    python demo_chatbot.py chat-model --web            # a chat page at http://127.0.0.1:7860
    python demo_chatbot.py chat-model --compare        # the base model's answer beside the trained one
    python demo_chatbot.py chat-model --serve          # an OpenAI-compatible API at http://127.0.0.1:8000/v1

MODEL is the output directory of train_chatgpt_model.py (adapter or merged), a local model directory,
a .gguf file, a Hugging Face Hub id or a friendly name (default: smollm2-135m). In the chat, /help lists
the commands (quit, clear, history, /save FILE, /system TEXT); arrow keys edit the line and recall
earlier ones. With --serve, any OpenAI client works: base_url="http://127.0.0.1:8000/v1", any api_key.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from chatkit.cli import make_parser as build_parser, parse, run_main
from chatkit.errors import ChatkitError
from chatkit.options import ChatOptions, generation_settings


def make_parser():
    return build_parser(ChatOptions, __doc__)


def chat(argv: Optional[Sequence[str]] = None) -> int:
    options = parse(ChatOptions, __doc__, argv)
    query = options.query
    if query == "-":
        if sys.stdin is None:
            raise ChatkitError("--query -: there is no standard input to read the question from")
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "replace")
        query = raw.decode("utf-8", errors="replace").strip()
        if not query:
            raise ChatkitError("--query -: nothing was read from standard input")

    from chatkit.chat import ChatSession, base_session
    from chatkit.console import Console

    host = bare_host(options.host)  # "[::1]", as a URL writes it, is the address ::1
    api_key = (options.api_key or os.environ.get("CHATKIT_API_KEY") or "").strip() or None
    if options.serve and api_key is None and os.environ.get("CHATKIT_API_KEY"):
        raise ChatkitError("CHATKIT_API_KEY holds only spaces; set a key there, or unset it to serve without one")
    if options.web or options.serve:
        from chatkit.web import check_port

        check_port(host, options.served_port)

    if query is None:
        print("Loading the model...", file=sys.stderr)
    session = ChatSession(options.model, device=options.device, dtype=options.dtype,
                          system_prompt=options.system_prompt, settings=generation_settings(options),
                          reuse_cache=not options.no_cache_reuse, trust_remote_code=options.trust_remote_code)
    base = base_session(session) if options.compare else None
    if query is not None:
        if base is None:
            print(session.reply(query))
            return 0
        print(f"[Base model]\n{base.reply(query)}\n\n[Trained]\n{session.reply(query)}")
        return 0
    address = f"http://{url_host(host)}:{options.served_port}"
    if options.serve:
        from chatkit.server import serve

        print(f"Serving {session.describe()} as an OpenAI-compatible API at {address}/v1 (model "
              f"{served_name(options.model)!r}{'; API key required' if api_key else ''}; Ctrl-C stops)",
              file=sys.stderr)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {host}: anyone who can reach this machine can use the model"
                  + ("" if api_key else "; set --api-key KEY (or CHATKIT_API_KEY) so only you can"),
                  file=sys.stderr)
        serve(session, served_name(options.model), host=host, port=options.served_port,
              queue=options.queue, verbose=options.verbose, api_key=api_key)
        return 0
    if options.web:
        from chatkit.web import serve

        print(f"Serving {session.describe()} at {address} (Ctrl-C stops)", file=sys.stderr)
        serve(session, host=host, port=options.served_port, share=options.share, base=base)
        return 0
    return Console(session, base=base).run()


def bare_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def served_name(model: Optional[str]) -> str:
    """The model's name in the API: its folder or file name, or the name typed."""
    from pathlib import Path

    from chatkit.options import STARTER_MODEL

    return Path(model.rstrip("/\\")).name if model else STARTER_MODEL


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(chat, argv)


if __name__ == "__main__":
    sys.exit(main())
