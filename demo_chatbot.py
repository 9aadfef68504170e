#!/usr/bin/env python3
"""Talk to a chat model in the console, or ask it one question.

Examples:
    python demo_chatbot.py chat-model
    python demo_chatbot.py chat-model --query "What is AI?"
    echo "What is AI?" | python demo_chatbot.py chat-model --query -
    python demo_chatbot.py smollm2-135m --temperature 0 --max-new-tokens 100
    python demo_chatbot.py ./model.gguf --system-prompt "You are a pirate."
    python demo_chatbot.py chat-model --web            # a chat page at http://127.0.0.1:7860

MODEL is the output directory of train_chatgpt_model.py (adapter or merged), a local model directory,
a .gguf file, a Hugging Face Hub id or a friendly name (default: smollm2-135m). In the chat, /help lists
the commands (quit, clear, history, /save FILE, /system TEXT).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from chatkit.errors import ChatkitError, run_main


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help="model to load (default: smollm2-135m)")
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same as the MODEL argument")
    parser.add_argument("--query", "-q", metavar="TEXT", help="answer TEXT on stdout and exit (- reads stdin)")
    web = parser.add_argument_group("web page (needs gradio)")
    web.add_argument("--web", action="store_true", help="serve a chat page instead of the console chat")
    web.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)")
    web.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    web.add_argument("--share", action="store_true", help="also open a public gradio.live link (only when asked)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=0.9, help="(default: %(default)s)")
    gen.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=256,
                     help="longest answer in tokens (default: %(default)s)")
    gen.add_argument("--repetition-penalty", type=float, default=1.1, help="(default: %(default)s)")
    gen.add_argument("--system-prompt", help="system message (default: the one the model was trained with)")
    gen.add_argument("--seed", type=int, help="make sampling repeatable")
    gen.add_argument("--no-cache-reuse", action="store_true", help="recompute the whole history every turn")
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    hw.add_argument("--dtype", help="auto (default), float32, bfloat16, float16")
    hw.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub repository")
    return parser


def chat(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.model and args.model_flag:
        parser.error("give the model once: as MODEL or as --model")
    problems = []
    if args.max_new_tokens <= 0:
        problems.append("--max-new-tokens must be positive")
    if args.temperature < 0:
        problems.append("--temperature must not be negative")
    if not 0 < args.top_p <= 1:
        problems.append("--top-p must be in (0, 1]")
    if args.web and args.query is not None:
        problems.append("--web and --query: choose one")
    if (args.share or args.host != "127.0.0.1" or args.port != 7860) and not args.web:
        problems.append("--host, --port and --share go with --web")
    if problems:
        parser.error("; ".join(problems))
    query = args.query
    if query == "-":
        query = sys.stdin.read().strip()
        if not query:
            raise ChatkitError("--query -: nothing was read from standard input")

    from chatkit.chat import ChatSession, GenerationSettings
    from chatkit.console import Console

    settings = GenerationSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    if query is None:
        print("Loading the model...", file=sys.stderr)
    session = ChatSession(args.model or args.model_flag, device=args.device, dtype=args.dtype,
                          system_prompt=args.system_prompt, settings=settings,
                          reuse_cache=not args.no_cache_reuse, trust_remote_code=args.trust_remote_code)
    if query is not None:
        print(session.reply(query))
        return 0
    if args.web:
        from chatkit.web import serve

        print(f"Serving {session.describe()} at http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr)
        serve(session, host=args.host, port=args.port, share=args.share)
        return 0
    return Console(session).run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(chat, argv)


if __name__ == "__main__":
    sys.exit(main())
