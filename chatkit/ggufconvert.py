"""A model's weights and numbers as llama.cpp takes them: one converter per llama.cpp graph, registered
by the graph's name (the family table's `gguf_arch`), the way llama.cpp's own converter registers one
class per architecture. Each says the graph's parameters (GGUF keys from the config), its layer count,
and each weight's layout; the family's special cases come from the family table's fields.

Two layouts differ from Hugging Face's:

- Llama-graph q and k projections: llama.cpp's rotary embedding pairs neighbouring dimensions,
  Hugging Face's pairs the two halves of each head, so the rows of each head are interleaved.
- GPT-2's Conv1D weights are stored (in, out); llama.cpp wants (out, in), as nn.Linear has them.
"""

from __future__ import annotations

from typing import Dict, Optional

from .errors import ChatkitError
from .families import Family

CONVERTERS: Dict[str, "Converter"] = {}


def register(*graphs: str):
    """Class decorator: the converter for these llama.cpp graphs (gguf.MODEL_ARCH member names)."""
    def add(cls):
        for graph in graphs:
            CONVERTERS[graph] = cls()
        return cls
    return add


def converter_for(family: Family) -> "Converter":
    try:
        return CONVERTERS[family.gguf_arch]
    except KeyError:
        raise ChatkitError(f"exporting to GGUF: no converter for llama.cpp's {family.gguf_arch} graph") from None


@register("LLAMA", "QWEN2", "QWEN3", "GEMMA2", "GEMMA3", "PHI3")
class Converter:
    """The rotary decoder graphs: the config's standard names; q/k rows interleaved where the family's graph
    pairs neighbouring dimensions, Gemma's norms stored as 1 + w, Llama 3's rotary scaling as factors."""

    def block_count(self, config) -> int:
        return config.num_hidden_layers

    def add_parameters(self, writer, config, family: Family) -> None:
        """The numbers a runtime builds the network from, under llama.cpp's keys."""
        rope = _rope(config)
        if rope.get("rope_type", "default") not in ("default", "llama3") or (
                rope.get("rope_type") == "llama3" and not family.rope_interleaved):
            raise ChatkitError(f"exporting to GGUF: this model's rotary scaling ({rope['rope_type']}) is not "
                               "supported; models with plain rotary embeddings (and Llama 3's scaling) are")
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
        if family.local_attention and getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        for name, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                          ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if getattr(config, name, None):
                add(float(getattr(config, name)))

    def extra_tensors(self, config) -> Dict[str, object]:
        """Tensors the graph needs that the model has no weight for (Llama 3's rotary factors)."""
        import gguf

        if _rope(config).get("rope_type") == "llama3":
            return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(config)}
        return {}

    def rows(self, array, name: str, config, family: Family):
        """The output rows of a weight in the graph's layout (a LoRA B matrix's too): q/k rows interleaved
        for the Llama graph; else as they are."""
        if family.rope_interleaved and name.endswith(("q_proj.weight", "q_proj.bias")):
            return interleave_heads(array, config.num_attention_heads)
        if family.rope_interleaved and name.endswith(("k_proj.weight", "k_proj.bias")):
            return interleave_heads(array, config.num_key_value_heads)
        return array

    def layout(self, array, name: str, config, family: Family):
        """One weight (float32 numpy) in llama.cpp's layout."""
        array = self.rows(array, name, config, family)
        if family.norm_plus_one and name.endswith("norm.weight"):
            return array + 1.0
        return array


@register("GPT2")
class GPT2Converter(Converter):
    """GPT-2: learned positions, LayerNorm, Conv1D weights stored (in, out) and turned for llama.cpp."""

    CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")

    def block_count(self, config) -> int:
        return config.n_layer

    def add_parameters(self, writer, config, family: Family) -> None:
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)

    def extra_tensors(self, config) -> Dict[str, object]:
        return {}

    def rows(self, array, name: str, config, family: Family):
        return array  # B @ A is (out, in) for Conv1D too

    def layout(self, array, name: str, config, family: Family):
        return array.T if name.endswith(self.CONV1D) else array


def gguf_tensors(model, family: Family) -> Dict[str, "object"]:
    """The model's weights under llama.cpp's names and layout, as float32 numpy arrays."""
    import gguf

    config, converter = model.config, converter_for(family)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.gguf_arch), converter.block_count(config))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = converter.extra_tensors(config)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # the runtime reuses the token embeddings
        target = gguf_name(names, name)
        if target is None:
            if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
                continue  # recomputed by every runtime
            raise ChatkitError(f"exporting to GGUF: no GGUF name for the weight {name}")
        array = value.detach().to("cpu").float().numpy()
        tensors[target] = converter.layout(array, name, config, family).copy(order="C")
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
