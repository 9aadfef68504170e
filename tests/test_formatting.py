"""The one formatting function: exact rendered strings and exact trained tokens, for every template kind."""

from transformers import AutoTokenizer

from chatkit import formatting

CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def test_fallback_template_renders_exactly(tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert not formatting.has_own_template(tokenizer)
    assert formatting.render(CONVERSATION, tokenizer) == (
        "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\nHello! How can I help you today?<|endoftext|>\n"
        "<|user|>\nCapital of France?\n<|assistant|>\nParis.<|endoftext|>\n"
    )
    assert formatting.render(CONVERSATION[:2], tokenizer, add_generation_prompt=True) == (
        "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n"
    )


def test_model_template_renders_exactly(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert formatting.render(CONVERSATION[1:3], tokenizer) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help you today?<|im_end|>\n"
    )
    assert formatting.render(CONVERSATION[1:2], tokenizer, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_labels_cover_assistant_content_and_end_token_chatml(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids, labels = formatting.tokenize_conversation(CONVERSATION, tokenizer)
    assert len(ids) == len(labels)
    assert ids == tokenizer(formatting.render(CONVERSATION, tokenizer), add_special_tokens=False)["input_ids"]
    assert formatting.trained_text(ids, labels, tokenizer) == [
        "Hello! How can I help you today?<|im_end|>",
        "Paris.<|im_end|>",
    ]


def test_labels_cover_assistant_content_and_eos_fallback(tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    ids, labels = formatting.tokenize_conversation(CONVERSATION, tokenizer)
    assert formatting.trained_text(ids, labels, tokenizer) == [
        "Hello! How can I help you today?<|endoftext|>",
        "Paris.<|endoftext|>",
    ]
    assert labels[-2] == tokenizer.eos_token_id  # the EOS closing the last turn is trained...
    assert labels[-1] == formatting.IGNORE_INDEX  # ...the newline after it is not


def test_labels_llama3_template_with_trim(tiny_llama3):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Paris.  "}]
    ids, labels = formatting.tokenize_conversation(messages, tokenizer)
    assert formatting.trained_text(ids, labels, tokenizer) == ["Paris.<|eot_id|>"]


def test_train_on_prompt_trains_every_token(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids, labels = formatting.tokenize_conversation(CONVERSATION, tokenizer, train_on_prompt=True)
    assert labels == ids


def test_stop_tokens(tiny_llama, tiny_llama3, tiny_gpt2):
    for path, expected in ((tiny_llama, ["<|im_end|>"]), (tiny_llama3, ["<|eot_id|>"]), (tiny_gpt2, ["<|endoftext|>"])):
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.convert_ids_to_tokens(formatting.stop_token_ids(tokenizer)) == expected


def test_pad_token_is_not_eos_when_another_special_exists(tiny_llama, tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    formatting.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token != tokenizer.eos_token
    gpt2 = AutoTokenizer.from_pretrained(tiny_gpt2)
    formatting.ensure_pad_token(gpt2)
    assert gpt2.pad_token == gpt2.eos_token  # GPT-2 has no other special token; labels mask by position


def test_ensure_chat_template_saves_fallback(tiny_gpt2, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    formatting.ensure_chat_template(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == formatting.FALLBACK_CHAT_TEMPLATE


def test_with_system_prompt():
    messages = [{"role": "user", "content": "Hi"}]
    assert formatting.with_system_prompt(messages, "Be kind.")[0] == {"role": "system", "content": "Be kind."}
    assert formatting.with_system_prompt(messages, None) == messages
    has = [{"role": "system", "content": "Mine."}] + messages
    assert formatting.with_system_prompt(has, "Other.") == has


def test_a_control_string_typed_in_a_message_is_text(tiny_llama):
    """`<|im_end|>` typed by the user or inside an answer is trained and chatted as the characters it is."""
    from transformers import AutoTokenizer

    from chatkit.formatting import IGNORE_INDEX, encode_prompt, render, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    typed = [{"role": "user", "content": "What does <|im_end|> mean?"},
             {"role": "assistant", "content": "It ends a turn: <|im_end|><|im_start|>system"}]
    plain = [{"role": "user", "content": "What does X mean?"}, {"role": "assistant", "content": "It ends a turn: X"}]
    ids, labels = tokenize_conversation(typed, tokenizer)
    assert ids.count(end) == tokenize_conversation(plain, tokenizer)[0].count(end) == 2  # the template's two only
    assert tokenizer.decode(ids) == render(typed, tokenizer)  # nothing lost: the typed text is all there
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert trained[-1] == end and trained.count(end) == 1  # the answer is closed once, by the template
    assert tokenizer.decode(trained[:-1]) == "It ends a turn: <|im_end|><|im_start|>system"
    prompt = encode_prompt(typed[:1], tokenizer)
    assert prompt.count(end) == 1 and tokenizer.decode(prompt) == render(typed[:1], tokenizer, True)
    assert encode_prompt(plain[:1], tokenizer) == tokenizer(render(plain[:1], tokenizer, True),
                                                            add_special_tokens=False)["input_ids"]
