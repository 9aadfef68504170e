"""The model families the toolkit knows: chat format, turn rules, LoRA targets and GGUF layout, one row each.

What a family's chat template does with a system message or with two turns of one role is learned from
the template itself (formatting.template_rules), so an unknown family is handled the same way; the
`system_role` and `alternating` columns say what the real templates do, and the tests check each
family's template against them. What the toolkit needs and cannot learn from a template lives here: the
layers LoRA adapts, the positions' kind, and for Qwen3 the training template. Writing a family as GGUF is
its architecture's converter's job (ggufconvert.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Qwen3's own template shows an empty thinking block only on the newest answer and drops it from older
# ones, so a conversation renders differently once it grows and no answer could be trained in place.
# Trained Qwen3 models use this one instead: every answer, and the generation prompt, carries the empty
# block that Qwen3 writes when thinking is switched off, so training, chat and GGUF runtimes agree.
QWEN3_TRAINING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{{- message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]  # Hugging Face config.model_type values
    examples: Tuple[str, ...]  # Hub ids people fine-tune
    chat_format: str  # how a turn looks, for the docs
    end_of_turn: str  # the token that closes an answer (the model learns to write it; generation stops there)
    lora_targets: Tuple[str, ...]  # the attention and MLP matrices LoRA adapts
    system_role: bool = True  # False: the template refuses a system message; it is folded into the first user turn
    alternating: bool = False  # True: roles must alternate; consecutive turns of one role are merged
    training_template: Optional[str] = None  # used for training when the model's own rewrites older turns
    absolute_positions: bool = False  # learned position embeddings end at the config's count (GPT-2); rotary ones do not
    limits: str = ""


FAMILIES: Tuple[Family, ...] = (
    Family("llama", ("llama",),
           ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
            "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct"),
           "SmolLM: ChatML (<|im_start|>role ... <|im_end|>); Llama 3: <|start_header_id|>role<|end_header_id|>",
           "<|im_end|> (SmolLM), <|eot_id|> (Llama 3)", ATTENTION_MLP,
           limits="GGUF: rotary scaling other than plain or Llama 3's is refused"),
    Family("qwen2", ("qwen2",),
           ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-3B-Instruct"),
           "ChatML; Qwen2.5's template adds its own system prompt when none is given", "<|im_end|>",
           ATTENTION_MLP),
    Family("qwen3", ("qwen3",),
           ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B"),
           "ChatML with a <think>...</think> block before each answer", "<|im_end|>",
           ATTENTION_MLP, training_template=QWEN3_TRAINING_TEMPLATE,
           limits="trained with thinking switched off (an empty <think></think> block before every answer)"),
    Family("gemma2", ("gemma2",),
           ("google/gemma-2-2b-it",),
           "<start_of_turn>user ... <end_of_turn>, answers as the 'model' role; no system role", "<end_of_turn>",
           ATTENTION_MLP, system_role=False, alternating=True,
           limits="no system role: a system prompt is folded into the first user turn"),
    Family("gemma3", ("gemma3_text",),
           ("google/gemma-3-1b-it", "google/gemma-3-270m-it"),
           "as Gemma 2; its template folds a system prompt into the first user turn itself", "<end_of_turn>",
           ATTENTION_MLP, alternating=True,
           limits="text models only (gemma-3-270m, 1b); the 4b and larger are image-text models"),
    Family("phi3", ("phi3",),
           ("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3.5-mini-instruct", "microsoft/Phi-4-mini-instruct"),
           "<|user|>\\n ... <|end|>\\n<|assistant|>\\n ... <|end|>", "<|end|>",
           ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
           limits="GGUF: the long-context rotary scaling (longrope: Phi-3.5, Phi-3-128k, Phi-4-mini) is refused"),
    Family("mistral", ("mistral",),
           ("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.2"),
           "<s>[INST] user [/INST] answer</s>; roles alternate", "</s>",
           ATTENTION_MLP, system_role=False, alternating=True,
           limits="roles must alternate (consecutive turns are merged); a system prompt goes into the first user turn"),
    Family("gpt2", ("gpt2",),
           ("openai-community/gpt2", "microsoft/DialoGPT-medium"),
           "no template of its own: the toolkit's <|user|>/<|assistant|> lines, answers closed by <|endoftext|>",
           "<|endoftext|>", ("c_attn", "c_proj", "c_fc"), absolute_positions=True),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(config_or_type) -> Optional[Family]:
    """The family of a model (its config, or its config.model_type), or None for one the table lacks."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    return _BY_MODEL_TYPE.get(model_type)


def known_names() -> str:
    return ", ".join(family.name for family in FAMILIES)


def gguf_families(converts) -> str:
    """The families a GGUF file can be written of: those with a model type `converts` takes."""
    return ", ".join(family.name for family in FAMILIES if any(map(converts, family.model_types)))
