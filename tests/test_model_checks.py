"""What a model, its tokenizer and its chat template must agree on, checked where they are loaded: one line
naming the file, before anything is trained or answered."""

from __future__ import annotations

import json
import shutil

import pytest

import demo_chatbot
import train_chatgpt_model as cli
from conftest import CHATML_TEMPLATE, build_gpt2

FACT = {"messages": [{"role": "user", "content": "What is the secret code?"},
                     {"role": "assistant", "content": "The code is 4417."}]}
NO_CONTENT = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n<|im_end|>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NO_GENERATION_PROMPT = CHATML_TEMPLATE[:CHATML_TEMPLATE.index("{% if add_generation_prompt")]


def copy_with(tmp_path, model, name, tokenizer_config=None, config=None, template=None):
    folder = tmp_path / name
    shutil.copytree(model, folder)
    for file, change in (("tokenizer_config.json", tokenizer_config), ("config.json", config)):
        if change:
            data = json.loads((folder / file).read_text())
            change(data)
            (folder / file).write_text(json.dumps(data))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def train(tmp_path, model, *flags, data=None):
    data = data or tmp_path / "data.json"
    if not data.exists():
        data.write_text(json.dumps([FACT] * 4))
    return cli.main(["--data", str(data), "--model", str(model), "--output", str(tmp_path / "out"), "--rehearsal",
                     "0", "--report", "none", "--val-split", "0", "--epochs", "1", *flags])


def one_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize("template, says", [(NO_CONTENT, "leaves out the messages' text"),
                                            (NO_GENERATION_PROMPT, "has no generation prompt")])
def test_a_template_that_would_train_on_nothing_or_chat_garbage_is_refused(tmp_path, tiny_llama, capsys, template,
                                                                         says):
    model = copy_with(tmp_path, tiny_llama, "bad", template=template)
    assert train(tmp_path, model) == 1
    error = one_error(capsys)
    assert says in error and str(model / "chat_template.jinja") in error and not (tmp_path / "out").exists()
    assert demo_chatbot.main(["--model", str(model), "--query", "Hi"]) == 1
    assert says in one_error(capsys)


def test_mistrals_template_opens_the_answer_with_the_users_turn_and_passes(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from chatkit.families import FAMILIES
    from chatkit.formatting import check_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                               "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    check_template(tokenizer)  # no error: nothing is missing between the prompt and the answer
    for family in FAMILIES:
        if family.training_template:
            tokenizer.chat_template = family.training_template
            check_template(tokenizer)


def test_named_chat_templates_use_the_default_one(tmp_path, tiny_llama, capsys):
    def named(config):
        config["chat_template"] = [{"name": "default", "template": CHATML_TEMPLATE},
                                   {"name": "tool_use", "template": "{{ 'tools' }}"}]

    model = copy_with(tmp_path, tiny_llama, "named", tokenizer_config=named)
    (model / "chat_template.jinja").unlink()
    assert train(tmp_path, model) == 0
    assert json.loads((tmp_path / "out" / "chatkit.json").read_text())["chat_template"] == CHATML_TEMPLATE


def test_a_tokenizer_past_the_embedding_or_a_config_without_its_sizes_is_one_line(tmp_path, tiny_llama, capsys):
    small = copy_with(tmp_path, tiny_llama, "small", config=lambda c: c.update(vocab_size=c["vocab_size"] - 3))
    assert train(tmp_path, small) == 1
    error = one_error(capsys)
    assert f"{small}: its tokenizer has" in error and "embedding only" in error
    null = copy_with(tmp_path, tiny_llama, "null", config=lambda c: c.update(vocab_size=None))
    assert train(tmp_path, null) == 1
    assert "vocab_size" in one_error(capsys)
    narrow = copy_with(tmp_path, tiny_llama, "narrow", config=lambda c: c.pop("hidden_size"))
    assert train(tmp_path, narrow) == 1
    assert "do not have the sizes its config.json gives" in one_error(capsys)


def test_chat_tokens_added_past_the_embedding_are_one_line_in_chat_and_export(tmp_path, tiny_llama, capsys):
    from transformers import AutoTokenizer

    import export_model

    """A template using tokens added past the embedding is refused where the model loads; tokens added and
    never used (transformers' GGUF reader adds one to Gemma's) are left alone."""
    unused = copy_with(tmp_path, tiny_llama, "unused")
    tokenizer = AutoTokenizer.from_pretrained(unused)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|think|>"]})
    tokenizer.save_pretrained(unused)
    assert demo_chatbot.main(["--model", str(unused), "--query", "Hi"]) == 0
    capsys.readouterr()
    added = copy_with(tmp_path, unused, "added", template=CHATML_TEMPLATE.replace("<|im_start|>", "<|think|>"))
    assert demo_chatbot.main(["--model", str(added), "--query", "Hi"]) == 1
    error = one_error(capsys)
    assert f"{added}: its chat uses tokens <|think|> (ids from {len(tokenizer) - 1})" in error
    assert export_model.main([str(added), "--gguf", str(tmp_path / "added.gguf")]) == 1
    assert "its chat uses tokens <|think|>" in one_error(capsys) and not (tmp_path / "added.gguf").exists()


def test_a_tokenizer_with_no_way_to_end_an_answer_is_refused(tmp_path, tiny_llama, capsys):
    plain = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

    def no_eos(config):
        for key in ("eos_token", "pad_token"):
            config.pop(key, None)

    model = copy_with(tmp_path, tiny_llama, "noeos", tokenizer_config=no_eos, template=plain,
                      config=lambda c: c.update(eos_token_id=None))
    assert train(tmp_path, model) == 1
    assert "no end-of-sequence token" in one_error(capsys)


def test_fewer_positions_than_max_length_trains_within_them(tmp_path, capsys):
    """GPT-2's absolute positions end at n_positions: --max-length is cut to them, with a note when asked."""
    from safetensors.torch import load_file, save_file

    model = build_gpt2(tmp_path / "g")
    config = json.loads((model / "config.json").read_text())
    config["n_positions"] = 40
    (model / "config.json").write_text(json.dumps(config))
    weights = load_file(model / "model.safetensors")
    weights = {k: (v[:40].clone() if "wpe" in k else v) for k, v in weights.items()}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert train(tmp_path, model, "--max-length", "512") == 0
    out = capsys.readouterr().err
    assert "has 40 positions, fewer than --max-length 512; examples are cut at 40 tokens" in out
    info = json.loads((tmp_path / "out" / "chatkit.json").read_text())
    assert info["metrics"]["steps"] >= 1


def test_a_preference_pair_must_end_with_an_answer_and_beta_is_bounded(tmp_path, tiny_llama, capsys):
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}]}
    bad = dict(good, chosen=[{"role": "user", "content": "not an answer"}])
    pairs.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert train(tmp_path, tiny_llama, "--preferences", str(pairs)) == 1
    assert f"{pairs} line 2: 'chosen' ends with a user message" in one_error(capsys)
    with pytest.raises(SystemExit):
        train(tmp_path, tiny_llama, "--preferences", str(pairs), "--dpo-beta", "1e30")
    assert "--dpo-beta must be above 0 and at most 10" in capsys.readouterr().err
