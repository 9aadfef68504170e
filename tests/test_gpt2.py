"""The GPT-2 chatbot on a tiny local GPT-2: text and dialogue training, .pt files, examples, the console."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt_generate
import train_chatbot
from chatkit import checkpoint
from chatkit.errors import ChatkitError
from chatkit.gpt2 import ChatbotTrainOptions, GPT2Chatbot, text_blocks, train_chatbot as train

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [{"user": "What time does the museum open?", "bot": "The museum opens at 9 am."},
         {"user": "Where is the museum?", "bot": "It is on River Street."}]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_text_blocks_overlap_trains_each_token_once():
    blocks = text_blocks(list(range(10)), block_size=4, overlap=1)
    assert [b["input_ids"] for b in blocks] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert [b["labels"] for b in blocks] == [[0, 1, 2, 3], [-100, 4, 5, 6], [-100, 7, 8, 9]]
    with pytest.raises(ChatkitError, match="--overlap"):
        text_blocks([1, 2, 3], block_size=4, overlap=4)


def test_text_training_lowers_validation_perplexity(tmp_path, tiny_gpt2):
    text = tmp_path / "book.txt"
    text.write_text("The museum of Zorblat opens at nine in the morning and closes at five. " * 80)
    _, metrics = train(ChatbotTrainOptions(model=str(tiny_gpt2), text_file=str(text), save_path=str(tmp_path / "m.pt"),
                                           epochs=2, learning_rate=1e-3, max_length=64))
    assert metrics["measured_on"] == "validation"
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.5


def test_conversation_training_reproduces_the_reply(tmp_path, tiny_gpt2):
    pairs = tmp_path / "examples.json"
    pairs.write_text(json.dumps(PAIRS))
    saved = tmp_path / "trained_model.pt"
    assert train_chatbot.main(["--model", str(tiny_gpt2), "--conversation_file", str(pairs), "--epochs", "60",
                               "--learning-rate", "5e-3", "--batch_size", "2", "--save_path", str(saved)]) == 0
    bot = GPT2Chatbot(model_name="gpt2-small (124M)", temperature=0, max_new_tokens=20,
                      repetition_penalty=1.0).load_model(str(saved))
    assert bot.chat("What time does the museum open?") == "The museum opens at 9 am."
    assert bot.history[-1] == {"role": "assistant", "content": "The museum opens at 9 am."}
    bot.reset()
    assert bot.history == []


def test_pt_round_trip_in_a_fresh_process(tmp_path, tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatkit.formatting import ensure_chat_template

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    ensure_chat_template(tokenizer)
    path = tmp_path / "model.pt"
    checkpoint.save_checkpoint(model, tokenizer, path, base_model="gpt2-small (124M)")
    assert checkpoint.is_safetensors(path)  # no pickle inside
    code = ("import json, torch\n"
            "from chatkit.models import load_model\n"
            "loaded = load_model(%r)\n"
            "m, t, base = loaded.model, loaded.tokenizer, loaded.trained_from\n"
            "print(json.dumps({'logits': m(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits.tolist(), 'base': base,"
            " 'template': t.chat_template, 'eos': t.eos_token}))") % str(path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         cwd=ROOT)
    loaded = json.loads(out.stdout)
    assert torch.equal(torch.tensor(loaded["logits"]), logits(model))
    assert (loaded["base"], loaded["template"], loaded["eos"]) == ("gpt2-small (124M)", tokenizer.chat_template,
                                                                    "<|endoftext|>")


def test_plain_state_dict_pt_loads_onto_the_named_model(tmp_path, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.5)  # different from the base weights
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    bot = GPT2Chatbot(model_name=str(tiny_gpt2)).load_model(str(path))
    assert torch.equal(logits(bot.session.model), logits(model))


def test_pickled_object_pt_is_refused(tmp_path, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "whole.pt"
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_gpt2), path)
    with pytest.raises(ChatkitError, match="refusing to load it: it holds a pickled Python object"):
        GPT2Chatbot(model_name=str(tiny_gpt2)).load_model(str(path))


def test_custom_examples_are_prior_exchanges_and_respect_the_window(tiny_gpt2):
    bot = GPT2Chatbot(model_name=str(tiny_gpt2), temperature=0, max_new_tokens=4)
    bot.add_custom_examples(PAIRS)
    assert bot.examples == PAIRS
    session = bot.session
    prompt = session.tokenizer.decode(session.prompt_ids("Hi"))
    assert prompt == ("<|user|>\nWhat time does the museum open?\n<|assistant|>\nThe museum opens at 9 am.<|endoftext|>\n"
                      "<|user|>\nWhere is the museum?\n<|assistant|>\nIt is on River Street.<|endoftext|>\n"
                      "<|user|>\nHi\n<|assistant|>\n")
    full = len(session.prompt_ids("Hi"))
    session.max_context = full + 4 - 1  # one token short: the oldest example goes first
    assert session.tokenizer.decode(session.prompt_ids("Hi")) == (
        "<|user|>\nWhere is the museum?\n<|assistant|>\nIt is on River Street.<|endoftext|>\n<|user|>\nHi\n<|assistant|>\n")
    assert session.examples_in_prompt == 1 and bot.examples == PAIRS  # left out of the prompt, not forgotten
    with pytest.raises(ChatkitError, match="custom example 0"):
        bot.add_custom_examples([{"user": "no bot"}])
    bot.clear_examples()
    assert bot.examples == [] and session.tokenizer.decode(session.prompt_ids("Hi")) == "<|user|>\nHi\n<|assistant|>\n"


def test_interactive_after_training(tmp_path, tiny_gpt2, monkeypatch, capsys):
    pairs = tmp_path / "examples.json"
    pairs.write_text(json.dumps(PAIRS))
    lines = iter(["Where is the museum?", "history", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert train_chatbot.main(["--model", str(tiny_gpt2), "--conversation-file", str(pairs), "--epochs", "1",
                               "--save-path", str(tmp_path / "dir-model"), "--interactive"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Chatting with ") and "\nBot: " in out and "[user] Where is the museum?" in out
    assert out.endswith("Bye.\n")
    assert (tmp_path / "dir-model" / "config.json").is_file()  # a directory path saves a model directory


def test_gpt_generate_prints_a_continuation(tmp_path, tiny_gpt2, capsys):
    expected = GPT2Chatbot(model_name=str(tiny_gpt2), temperature=0).generate("The museum", max_new_tokens=6)
    assert gpt_generate.main(["--model", str(tiny_gpt2), "--prompt", "The museum", "--temperature", "0",
                              "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "The museum" + expected + "\n"
    assert len(expected) > 0


def test_train_chatbot_needs_a_file(capsys):
    with pytest.raises(SystemExit):
        train_chatbot.main(["--epochs", "1"])
    assert "give --text_file, --conversation_file, or both" in capsys.readouterr().err


@pytest.mark.parametrize("save", ["bot.pt", "bot-dir"])
def test_training_never_removes_what_it_did_not_create(tmp_path, tiny_gpt2, save):
    """The user's folders beside --save_path (named as the old checkpoint folder was) stay untouched."""
    pairs = tmp_path / "examples.json"
    pairs.write_text(json.dumps(PAIRS))
    for mine in (tmp_path / "bot-run", tmp_path / "bot-dir" / "run"):
        mine.mkdir(parents=True)
        (mine / "notes.txt").write_text("mine")
    assert train_chatbot.main(["--model", str(tiny_gpt2), "--conversation-file", str(pairs), "--epochs", "1",
                               "--save-path", str(tmp_path / save), "--overwrite"]) == 0
    for mine in (tmp_path / "bot-run", tmp_path / "bot-dir" / "run"):
        assert (mine / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".bot*-run-*")) and not list((tmp_path / "bot-dir").glob(".bot*-run-*"))
    assert (tmp_path / save).exists()
