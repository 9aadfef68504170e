"""Tiny random models of each family in chatkit.families, with tokenizers whose chat templates write each
family's real format (written for these tests after the families' published templates).

Byte-level BPE families (SmolLM/Llama, Qwen, GPT-2) get a byte-level tokenizer split the family's way;
SentencePiece families (Gemma, Phi-3, Mistral) a BPE with byte fallback spelled with '▁', as their
tokenizer.json files are.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import CHATML_TEMPLATE, CORPUS, LLAMA3_TEMPLATE, build_tokenizer

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Qwen3: the newest answer (after the last user turn) shows its thinking block, older answers lose it.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=0) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Gemma 3 folds a system message into the first user turn itself.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


PADDED_ROWS = 27  # embedding rows past the tokenizer, as real Qwen2.5 and Phi-3 checkpoints have

def byte_level_tokenizer(specials, split=None, **named):
    """build_tokenizer, optionally splitting text with the family's regex before byte-level BPE."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer = build_tokenizer(specials, **named)
    if split:
        backend = tokenizer.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    return tokenizer


def sentencepiece_tokenizer(specials, prefix_space=True, vocab_size=420, **named):
    """A SentencePiece-style BPE: '▁' for spaces, the 256 byte tokens <0x00>..<0xFF> as fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spelling = ([normalizers.Prepend("▁")] if prefix_space else []) + [normalizers.Replace(" ", "▁")]
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence(spelling)
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({f"<0x{byte:02X}>": len(specials) + byte for byte in range(256)})
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=specials[0], fuse_unk=True))
    tok.normalizer = normalizers.Sequence(spelling)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def _save(path: Path, model_class, config, tokenizer, template) -> Path:
    import torch

    if template is not None:
        tokenizer.chat_template = template
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, initializer_range=0.3)  # wide logits: LoRA moves them fast


def _ids(tokenizer, **names):
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def build_qwen2(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], split=QWEN_SPLIT,
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # Qwen2.5 pads its vocabulary past the tokenizer (151,665 tokens in 151,936 rows): so does this one
    config = Qwen2Config(vocab_size=len(tokenizer) + PADDED_ROWS, tie_word_embeddings=True,
                         **_ids(tokenizer, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"), **SMALL)
    return _save(path, Qwen2ForCausalLM, config, tokenizer, QWEN25_TEMPLATE)


def build_qwen3(path: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                                     split=QWEN_SPLIT, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # head_dim 128 as every Qwen3 has (transformers' GGUF reader assumes it)
    config = Qwen3Config(vocab_size=len(tokenizer), tie_word_embeddings=True, head_dim=128,
                         **_ids(tokenizer, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"), **SMALL)
    return _save(path, Qwen3ForCausalLM, config, tokenizer, QWEN3_TEMPLATE)


# Heads of 256 as gemma-2-2b and gemma-3-1b have (llama.cpp and transformers' GGUF reader scale by them).
GEMMA_HEADS = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=256)


def _gemma_tokenizer():
    return sentencepiece_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                                   prefix_space=False, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_gemma2(path: Path) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = _gemma_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), **GEMMA_HEADS,
                          **_ids(tokenizer, bos_token_id="<bos>", eos_token_id="<end_of_turn>", pad_token_id="<pad>"),
                          **SMALL)
    return _save(path, Gemma2ForCausalLM, config, tokenizer, GEMMA2_TEMPLATE)


def build_gemma3(path: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = _gemma_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tokenizer), **GEMMA_HEADS,
                              **_ids(tokenizer, bos_token_id="<bos>", eos_token_id="<end_of_turn>",
                                     pad_token_id="<pad>"), **SMALL)
    return _save(path, Gemma3ForCausalLM, config, tokenizer, GEMMA3_TEMPLATE)


def build_phi3(path: Path) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = sentencepiece_tokenizer(["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>",
                                         "<|assistant|>", "<|end|>"], bos_token="<s>", eos_token="<|endoftext|>",
                                        unk_token="<unk>", pad_token="<|endoftext|>")
    # Phi-3-mini: 32,011 tokens in 32,064 rows
    config = Phi3Config(vocab_size=-(-len(tokenizer) // 64) * 64 + 64, tie_word_embeddings=False, sliding_window=None,
                        **_ids(tokenizer, bos_token_id="<s>", eos_token_id="<|endoftext|>",
                               pad_token_id="<|endoftext|>"), **SMALL)
    return _save(path, Phi3ForCausalLM, config, tokenizer, PHI3_TEMPLATE)


def build_mistral(path: Path) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = sentencepiece_tokenizer(["<unk>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = MistralConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, sliding_window=None,
                           **_ids(tokenizer, bos_token_id="<s>", eos_token_id="</s>"), **SMALL)
    return _save(path, MistralForCausalLM, config, tokenizer, MISTRAL_TEMPLATE)


def build_llama3(path: Path) -> Path:
    """Llama 3.2's shape: its header template and its long-context rotary scaling ("llama3")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"], bos_token="<|begin_of_text|>",
                                     eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, rope_parameters=rope,
                         **_ids(tokenizer, bos_token_id="<|begin_of_text|>", eos_token_id="<|eot_id|>",
                                pad_token_id="<|end_of_text|>"), **SMALL)
    return _save(path, LlamaForCausalLM, config, tokenizer, LLAMA3_TEMPLATE)


def build_smollm(path: Path) -> Path:
    from conftest import build_llama

    return build_llama(path, template=CHATML_TEMPLATE)


def build_gpt2(path: Path) -> Path:
    """GPT-2 with its own 1024 positions (transformers' GGUF reader assumes that many)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save(path, GPT2LMHeadModel, config, tokenizer, None)


# family -> (builder, the end-of-turn token an answer is closed by)
BUILDERS = {
    "llama": (build_smollm, "<|im_end|>"),
    "llama3": (build_llama3, "<|eot_id|>"),
    "qwen2": (build_qwen2, "<|im_end|>"),
    "qwen3": (build_qwen3, "<|im_end|>"),
    "gemma2": (build_gemma2, "<end_of_turn>"),
    "gemma3": (build_gemma3, "<end_of_turn>"),
    "phi3": (build_phi3, "<|end|>"),
    "mistral": (build_mistral, "</s>"),
    "gpt2": (build_gpt2, "<|endoftext|>"),
}
