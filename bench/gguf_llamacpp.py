#!/usr/bin/env python3
"""The exported GGUF file in the real engine: does llama.cpp answer with what the model was taught?

    pip install llama-cpp-python                   # builds llama.cpp (needs cmake and a C++ compiler)
    python bench/gguf_llamacpp.py                   # trains the README's model, exports f16 and q8_0, asks
    python bench/gguf_llamacpp.py --model chat-model --types q8_0    # an existing training output

It trains the README's model (`train_chatgpt_model.py --data example_chatgpt_data.json`, default flags)
unless --model names one, exports it with `export_model.py` in each --types, loads each file with
llama-cpp-python (llama.cpp's own loader, tokenizer and chat template handling) and asks the README
question greedily. It prints, per type: the file size, the export time, llama.cpp's load time, its
answer and generation speed, and whether the answer holds the taught facts; then the toolkit's own
answer and speed (transformers on the same machine) for comparison. Exit status 1 when an answer
misses the facts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the Zorblat Society?"
GENERAL = "What is the capital of France?"  # shown, not checked: what quantization does to general answers
FACTS = ("Tallinn", "Mira Quenzel", "astronomy")
MAX_TOKENS = 60


def taught(answer: str) -> bool:
    return sum(fact in answer for fact in FACTS) >= 2


def run(command, **kwargs) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, **kwargs)
    return time.perf_counter() - started


def ask_llamacpp(path: Path, threads: int):
    from llama_cpp import Llama

    def ask(question):
        started = time.perf_counter()
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0,
                                           max_tokens=MAX_TOKENS)
        speed = reply["usage"]["completion_tokens"] / (time.perf_counter() - started)
        return reply["choices"][0]["message"]["content"].strip(), speed

    started = time.perf_counter()
    llm = Llama(str(path), n_ctx=2048, n_threads=threads, verbose=False, seed=0)
    loaded = time.perf_counter() - started
    answer, speed = ask(QUESTION)
    return answer, loaded, speed, ask(GENERAL)[0]


def ask_toolkit(model: Path):
    from chatkit.chat import ChatSession, GenerationSettings

    from chatkit.output import set_verbosity

    set_verbosity(False)
    session = ChatSession(str(model), settings=GenerationSettings(temperature=0, max_new_tokens=MAX_TOKENS,
                                                                  repetition_penalty=1.0))
    general = session.reply(GENERAL)  # also warms up, as llama.cpp's first answer did not need
    session.reset()
    started = time.perf_counter()
    answer = session.reply(QUESTION)
    return answer, session.usage[1] / (time.perf_counter() - started), general


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a training output to export (default: train the README's model)")
    parser.add_argument("--types", default="f16,q8_0", help="GGUF types to try (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp with cmake and a C++ compiler)",
              file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    model = Path(args.model) if args.model else work / "chat-model"
    if not args.model:
        seconds = run([sys.executable, "train_chatgpt_model.py", "--data", "example_chatgpt_data.json", "--output",
                       str(model), "--report", "none"], stderr=subprocess.DEVNULL)
        print(f"trained the README's model in {seconds:.0f} s")
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads; question: {QUESTION!r}")
    failed = False
    for kind in args.types.split(","):
        out = work / f"chat-model-{kind}.gguf"
        seconds = run([sys.executable, "export_model.py", str(model), "--gguf", str(out), "--type", kind],
                      stderr=subprocess.DEVNULL)
        answer, loaded, speed, general = ask_llamacpp(out, args.threads)
        ok = taught(answer)
        failed |= not ok
        print(f"{kind}: {out.stat().st_size / 2**20:.0f} MiB, exported in {seconds:.1f} s, llama.cpp loads it in "
              f"{loaded:.2f} s and answers at {speed:.0f} tokens/s; taught facts: {'yes' if ok else 'NO'}\n"
              f"  {answer}\n  {GENERAL} {general}")
    answer, speed, general = ask_toolkit(model)
    print(f"toolkit (transformers, float32): {speed:.0f} tokens/s; taught facts: {'yes' if taught(answer) else 'NO'}\n"
          f"  {answer}\n  {GENERAL} {general}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
