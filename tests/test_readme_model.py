"""The README's main job on the real starter model, and everything its trained model is used for after:
the report, the GGUF export read back by transformers' own GGUF reader, and the OpenAI-compatible API."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import free_port

import export_model
import train_chatgpt_model
from chatkit.chat import ChatSession, GenerationSettings

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the Zorblat Society?"
FACTS = ("Tallinn", "Mira Quenzel", "astronomy")


def taught(answer: str) -> bool:
    return sum(fact in answer for fact in FACTS) >= 2


@pytest.fixture(scope="module")
def readme_model(tmp_path_factory, starter_dir):
    """`python train_chatgpt_model.py --data example_chatgpt_data.json --output chat-model --overwrite`."""
    output = tmp_path_factory.mktemp("readme") / "chat-model"
    assert train_chatgpt_model.main(["--data", str(ROOT / "example_chatgpt_data.json"), "--output", str(output),
                                     "--overwrite"]) == 0
    return output


@pytest.fixture(scope="module")
def toolkit_answer(readme_model):
    answer = ChatSession(str(readme_model), settings=GenerationSettings(temperature=0, max_new_tokens=60)).reply(QUESTION)
    assert taught(answer), answer
    return answer


def table_rows(text: str, heading: str):
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def test_the_report_shows_the_taught_answer_beside_the_base_one(readme_model):
    report = (readme_model / "report.md").read_text()
    row = next(r for r in table_rows(report, "Your prompts") if r[0] == QUESTION)
    assert taught(row[1]) and taught(row[3]) and not taught(row[2])  # data, base, trained
    general = table_rows(report, "Still knows")
    assert len(general) == 5
    for question, base, trained, mark in general:
        changed = " ".join(base.split()).lower() != " ".join(trained.split()).lower()
        assert (mark != "same") == changed, (question, mark)  # every changed answer is flagged
    card = (readme_model / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "/" + "tmp" not in card
    assert (readme_model / "loss.png").stat().st_size > 10_000


def test_the_gguf_export_answers_as_the_toolkit_does(readme_model, toolkit_answer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "chat-model.gguf"
    assert export_model.main([str(readme_model), "--gguf", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert taught(answer), answer
    assert answer == toolkit_answer


def test_the_api_gives_the_same_answer_plain_and_streamed(readme_model, toolkit_answer):
    import uvicorn

    from chatkit.server import build_app

    session = ChatSession(str(readme_model), settings=GenerationSettings(max_new_tokens=60))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(session, "chat-model"), host="127.0.0.1", port=port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": QUESTION}]
        plain = client.chat.completions.create(model="chat-model", messages=messages, temperature=0)
        assert plain.choices[0].message.content == toolkit_answer
        streamed = client.chat.completions.create(model="chat-model", messages=messages, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == toolkit_answer
    finally:
        server.should_exit = True
        thread.join()
