"""A model's weights and numbers as llama.cpp takes them: one converter per architecture, registered by the
Hugging Face architecture names it converts (the model's class, as in its config.json's `architectures`),
the way llama.cpp's own converter registers one class per architecture. Each says its llama.cpp graph,
the graph's parameters (GGUF keys from the config), its layer count, each weight's layout and the tensors
the graph needs that the model has no weight for: the architecture's special cases live in its class.

Two layouts differ from Hugging Face's:

- Llama-graph q and k projections: llama.cpp's rotary embedding pairs neighbouring dimensions,
  Hugging Face's pairs the two halves of each head, so the rows of each head are interleaved.
- GPT-2's Conv1D weights are stored (in, out); llama.cpp wants (out, in), as nn.Linear has them.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from .errors import ChatkitError

CONVERTERS: Dict[str, Type["Converter"]] = {}


def register(*architectures: str):
    """Class decorator: the converter for these Hugging Face architectures (model class names)."""
    def add(cls):
        for architecture in architectures:
            CONVERTERS[architecture] = cls
        return cls
    return add


def architecture_of(model) -> str:
    """The Hugging Face architecture of a model (a peft model's base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__


def converter_for(model) -> "Converter":
    """The converter of `model`'s architecture; one error line where llama.cpp has none this toolkit writes."""
    architecture = architecture_of(model)
    if architecture not in CONVERTERS:
        raise ChatkitError(f"exporting to GGUF: no converter for the {architecture} architecture; supported: "
                           f"{', '.join(sorted(CONVERTERS))}")
    return CONVERTERS[architecture](model.config)


def converts(model_type: str) -> bool:
    """Whether models of this config.model_type can be written as GGUF."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) in CONVERTERS


class Converter:
    """The rotary decoder graphs with the config's standard names; each architecture's class says its graph and
    overrides what differs."""

    graph = ""  # the llama.cpp graph: a gguf.MODEL_ARCH member's name

    def __init__(self, config):
        self.config = config

    def block_count(self) -> int:
        return self.config.num_hidden_layers

    def add_parameters(self, writer) -> None:
        """The numbers a runtime builds the network from, under llama.cpp's keys."""
        config, rope = self.config, _rope(self.config)
        self.check_rope(rope)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(int(head_dim * getattr(config, "partial_rotary_factor", 1.0)))
        writer.add_vocab_size(config.vocab_size)

    def check_rope(self, rope: dict) -> None:
        if rope.get("rope_type", "default") != "default":
            raise ChatkitError(f"exporting to GGUF: this model's rotary scaling ({rope['rope_type']}) is not "
                               "supported; models with plain rotary embeddings (and Llama 3's scaling) are")

    def extra_tensors(self) -> Dict[str, object]:
        """Tensors the graph needs that the model has no weight for."""
        return {}

    def rows(self, array, name: str):
        """The output rows of a weight in the graph's layout (a LoRA B matrix's too)."""
        return array

    def layout(self, array, name: str):
        """One weight (float32 numpy) in llama.cpp's layout."""
        return self.rows(array, name)


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaConverter(Converter):
    """The Llama graph: q/k rows interleaved for its rotary pairing, Llama 3's rotary scaling as factors."""

    graph = "LLAMA"

    def check_rope(self, rope: dict) -> None:
        if rope.get("rope_type") != "llama3":
            super().check_rope(rope)

    def extra_tensors(self) -> Dict[str, object]:
        import gguf

        if _rope(self.config).get("rope_type") == "llama3":
            return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(self.config)}
        return {}

    def rows(self, array, name: str):
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return interleave_heads(array, self.config.num_attention_heads)
        if name.endswith(("k_proj.weight", "k_proj.bias")):
            return interleave_heads(array, self.config.num_key_value_heads)
        return array


@register("Qwen2ForCausalLM")
class Qwen2Converter(Converter):
    graph = "QWEN2"


@register("Qwen3ForCausalLM")
class Qwen3Converter(Converter):
    graph = "QWEN3"


@register("Phi3ForCausalLM")
class Phi3Converter(Converter):
    """Phi-3: q, k and v in one matrix, as llama.cpp's graph has them; the long-context scaling is refused."""

    graph = "PHI3"


@register("Gemma2ForCausalLM")
class Gemma2Converter(Converter):
    """Gemma 2: norms stored as 1 + w (llama.cpp scales by w), a sliding window on some layers, soft-capped
    attention and logits."""

    graph = "GEMMA2"

    def add_parameters(self, writer) -> None:
        super().add_parameters(writer)
        if getattr(self.config, "sliding_window", None):
            writer.add_sliding_window(self.config.sliding_window)
        for name, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                          ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if getattr(self.config, name, None):
                add(float(getattr(self.config, name)))

    def layout(self, array, name: str):
        return array + 1.0 if name.endswith("norm.weight") else array


@register("Gemma3ForCausalLM")
class Gemma3Converter(Gemma2Converter):
    """Gemma 3 (text): as Gemma 2; its global layers' rotary settings are the graph's."""

    graph = "GEMMA3"


@register("GPT2LMHeadModel")
class GPT2Converter(Converter):
    """GPT-2: learned positions, LayerNorm, Conv1D weights stored (in, out) and turned for llama.cpp."""

    graph = "GPT2"
    CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

    def block_count(self) -> int:
        return self.config.n_layer

    def add_parameters(self, writer) -> None:
        config = self.config
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)

    def layout(self, array, name: str):
        return array.T if name.endswith(self.CONV1D) else array  # B @ A is (out, in) for Conv1D too: rows as they are


def tensor_names(converter: Converter):
    """llama.cpp's names for the converter's graph, for its layer count."""
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, converter.graph), converter.block_count())


def gguf_tensors(model) -> Dict[str, "object"]:
    """The model's weights under llama.cpp's names and layout, as float32 numpy arrays."""
    converter = converter_for(model)
    names = tensor_names(converter)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = converter.extra_tensors()
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # the runtime reuses the token embeddings
        target = gguf_name(names, name)
        if target is None:
            if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
                continue  # recomputed by every runtime
            raise ChatkitError(f"exporting to GGUF: no GGUF name for the weight {name}")
        array = value.detach().to("cpu").float().numpy()
        tensors[target] = converter.layout(array, name).copy(order="C")
    return tensors


def _rope(config) -> dict:
    """The rotary settings of a config; for models with two kinds of layers (Gemma 3), the global layers'."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope


def llama3_rope_factors(config):
    """Llama 3's long-context scaling as llama.cpp takes it: one divisor per rotary frequency ("rope_freqs")."""
    import math

    import numpy as np

    rope = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def interleave_heads(weight, heads: int):
    """Hugging Face's rotary layout of a q or k projection -> llama.cpp's (see the module docstring)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(names, name: str) -> Optional[str]:
    return names.get_name(name, try_suffixes=(".weight", ".bias"))
