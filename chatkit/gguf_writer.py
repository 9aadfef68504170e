"""Writing a model as one GGUF file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile.

The file holds what a runtime needs to use the model on its own: the architecture's numbers, the
tokenizer (tokens, their kinds, merges, special ids), the chat template the model was trained with,
and the weights in llama.cpp's layout. Names, keys and the Q8_0 encoding come from the `gguf`
package, which llama.cpp maintains. Two layouts differ from Hugging Face's:

- Llama-family q and k projections: llama.cpp's rotary embedding pairs neighbouring dimensions,
  Hugging Face's pairs the two halves of each head, so the rows of each head are interleaved.
- GPT-2's Conv1D weights are stored (in, out); llama.cpp wants (out, in), as nn.Linear has them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .errors import ChatkitError
from .files import atomic_path, read_training_info
from .formatting import ensure_chat_template, stop_token_ids
from .models import ModelSource, load_model, resolve_model
from .options import STARTER_MODEL, GenerationSettings

TYPES = ("f16", "q8_0", "f32")
SUPPORTED = {"llama": "LLAMA", "gpt2": "GPT2"}  # Hugging Face model_type -> gguf.MODEL_ARCH member
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
Q8_BLOCK = 32  # Q8_0 packs rows in blocks of 32 values; a row of another width stays f16


@dataclass
class Exported:
    path: str
    architecture: str
    tensors: int
    bytes: int
    chat_template: str
    system_prompt: Optional[str]
    stops: List[str]


def origin_gguf(source: ModelSource) -> Optional[str]:
    """The GGUF file a model was made from (itself, its base, or the model it was trained from), if any."""
    if source.kind == "gguf":
        return source.gguf_file
    if source.kind == "adapter" and source.base is not None:
        return origin_gguf(source.base)
    if source.kind == "directory":
        options = read_training_info(source.path).get("options")
        if not isinstance(options, dict):
            return None
        try:
            parent = resolve_model(options.get("model") or STARTER_MODEL)  # a merged model: what it was trained from
        except ChatkitError:
            return None
        if parent is not None and Path(parent.path).resolve() != Path(source.path).resolve():
            return origin_gguf(parent)
    return None


def pre_tokenizer_name(tokenizer, origin: Optional[str]) -> str:
    """llama.cpp's name for how text is split before BPE ("tokenizer.ggml.pre").

    A model from a GGUF file keeps its file's name (the tokenizer is the same one); otherwise it is
    read from the tokenizer's own pre-tokenizer."""
    if origin:
        import gguf

        field = gguf.GGUFReader(origin).get_field(gguf.Keys.Tokenizer.PRE)
        if field is not None:
            return field.contents()
    backend = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = backend.get("pretokenizers", [backend])
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # single digits, then GPT-2's byte-level split
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"


def add_tokenizer(writer, tokenizer, chat_template: str, pre: str) -> None:
    """Tokens (with control tokens marked), merges, special ids and the chat template."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE" or state["model"].get("byte_fallback"):
        raise ChatkitError("exporting to GGUF supports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM); this "
                           f"model's tokenizer is {state['model']['type']}")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in state.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int):
            add(token_id)
    writer.add_add_space_prefix(False)  # byte-level BPE encodes the spaces themselves
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_chat_template(chat_template)


def add_architecture(writer, config, architecture: str) -> None:
    """The numbers a runtime builds the network from, under llama.cpp's keys."""
    writer.add_context_length(config.max_position_embeddings if architecture == "llama" else config.n_positions)
    if architecture == "gpt2":
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ChatkitError(f"exporting to GGUF: this model's rotary scaling ({rope['rope_type']}) is not supported; "
                           "models with plain rotary embeddings are")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def interleave_heads(weight, heads: int):
    """Hugging Face's rotary layout of a q or k projection -> llama.cpp's (see the module docstring)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(model, architecture: str) -> Dict[str, "object"]:
    """The model's weights under llama.cpp's names and layout, as float32 numpy arrays."""
    import gguf

    config = model.config
    blocks = config.num_hidden_layers if architecture == "llama" else config.n_layer
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, SUPPORTED[architecture]), blocks)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {}
    for name, value in state.items():
        if name == "lm_head.weight" and tied:
            continue  # the runtime reuses the token embeddings
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
                continue  # recomputed by every runtime
            raise ChatkitError(f"exporting to GGUF: no GGUF name for the weight {name}")
        array = value.detach().to("cpu").float().numpy()
        if architecture == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = interleave_heads(array, config.num_attention_heads)
        elif architecture == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = interleave_heads(array, config.num_key_value_heads)
        elif architecture == "gpt2" and name.endswith(GPT2_CONV1D):
            array = array.T
        tensors[target] = array.copy(order="C")
    return tensors


def encode(array, kind: str):
    """(data, raw_dtype) for the writer: 1-D tensors stay f32; matrices take the asked type."""
    import gguf
    import numpy as np

    if array.ndim < 2 or kind == "f32":
        return array.astype(np.float32), None
    if kind == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        return quantized, gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def merged_model(source: ModelSource):
    """The model on the CPU in float32, with a LoRA adapter merged into its weights (in memory only)."""
    from .device import choose_placement

    loaded = load_model(source, choose_placement("cpu", "float32"))
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), loaded


def training_details(source: ModelSource, tokenizer):
    """The chat template and system prompt the model was trained with (its chatkit.json), else its own."""
    folder = source.path if source.kind in ("adapter", "directory") else None
    info = read_training_info(folder) if folder else {}
    if info.get("chat_template"):
        tokenizer.chat_template = info["chat_template"]
    return ensure_chat_template(tokenizer), info.get("system_prompt")


def write_gguf(spec: str, out: str, kind: str = "f16") -> Exported:
    """Write the model `spec` (anything --model accepts) as one GGUF file at `out` (atomically)."""
    import gguf

    source = resolve_model(spec)
    model, loaded = merged_model(source)
    architecture = model.config.model_type
    if architecture not in SUPPORTED:
        raise ChatkitError(f"exporting {spec} to GGUF: its architecture {architecture!r} is not supported; "
                           f"supported: {', '.join(SUPPORTED)} (Llama family, such as SmolLM2, and GPT-2)")
    tokenizer = loaded.tokenizer
    chat_template, system_prompt = training_details(source, tokenizer)
    tensors = gguf_tensors(model, architecture)
    pre = pre_tokenizer_name(tokenizer, origin_gguf(source))
    with atomic_path(out) as temporary:
        writer = gguf.GGUFWriter(temporary, architecture)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(out).stem)
        add_architecture(writer, model.config, architecture)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, chat_template, pre)
        for name, array in tensors.items():
            data, raw_dtype = encode(array, kind)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    return Exported(path=out, architecture=architecture, tensors=len(tensors), bytes=os.path.getsize(out),
                    chat_template=chat_template, system_prompt=system_prompt, stops=stops)


def modelfile_text(exported: Exported, settings: Optional[GenerationSettings] = None) -> str:
    """An Ollama Modelfile: the GGUF file, its stop words, the toolkit's sampling defaults, the system prompt.

    Ollama reads the chat template from the GGUF file itself."""
    settings = settings or GenerationSettings()
    lines = [f"FROM ./{Path(exported.path).name}", ""]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in exported.stops]
    lines += [f"PARAMETER temperature {settings.temperature:g}", f"PARAMETER top_p {settings.top_p:g}",
              f"PARAMETER repeat_penalty {settings.repetition_penalty:g}"]
    if exported.system_prompt:
        lines += ["", f'SYSTEM """{exported.system_prompt}"""']
    return "\n".join(lines) + "\n"
