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

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import ChatkitError
from .families import Family, family_of, gguf_families
from .files import atomic_path, read_training_info
from .formatting import check_chat_tokens, ensure_chat_template, stop_token_ids
from .models import ModelSource, load_model, merge_adapter, resolve_model
from .options import STARTER_MODEL, GenerationSettings

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


# llama.cpp's names for the text splits ("tokenizer.ggml.pre") of byte-level tokenizers, by their split regex.
SPLIT_NAMES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


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
    if kinds == ["Split", "ByteLevel"]:
        return SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"), "default")
    return "default"


def tokenizer_kind(tokenizer) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback), as GGUF names them."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model["type"] == "BPE" and model.get("byte_fallback"):
        return "llama"
    if model["type"] == "BPE":
        return "gpt2"
    raise ChatkitError(f"exporting to GGUF supports BPE tokenizers (byte-level, as GPT-2, Llama 3 and Qwen have, or "
                       f"SentencePiece-style, as Gemma, Mistral and Phi-3 have); this model's is {model['type']}")


def add_tokenizer(writer, tokenizer, chat_template: str, pre: str, rows: int = 0) -> None:
    """Tokens (with their kinds), merges, scores for SentencePiece vocabularies, special ids, the chat template.

    A vocabulary padded beyond the tokenizer (`rows`: the embedding's, as Qwen2.5's 151,936 for 151,665
    tokens) gets one unused [PADn] token per row past the last, as llama.cpp's converter writes it: the
    token list and the embedding must be the same length."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = tokenizer_kind(tokenizer)
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, rows)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
        if kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[index] = gguf.TokenType.BYTE
    for added in state.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if kind == "llama" and isinstance(tokenizer.unk_token_id, int):
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    if kind == "llama":  # llama.cpp merges the pair of highest score: a BPE vocabulary lists merges in order
        writer.add_token_scores([-float(index) for index in range(size)])
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int):
            add(token_id)
    # Byte-level BPE encodes spaces itself; a SentencePiece vocabulary may put '▁' before the text.
    writer.add_add_space_prefix(kind == "llama" and _prepends_space(state))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_chat_template(chat_template)


def _prepends_space(state: dict) -> bool:
    steps = [state.get("normalizer") or {}, state.get("pre_tokenizer") or {}]
    flat = [inner for step in steps for inner in step.get("normalizers", step.get("pretokenizers", [step]))]
    return any(step.get("type") == "Prepend" or (step.get("type") == "Metaspace"
                                                 and step.get("prepend_scheme", "always") != "never") for step in flat)


def _rope(config) -> dict:
    """The rotary settings of a config; for models with two kinds of layers (Gemma 3), the global layers'."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope


def add_architecture(writer, config, family: Family) -> None:
    """The numbers a runtime builds the network from, under llama.cpp's keys."""
    if family.name == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "llama3") or (
            rope.get("rope_type") == "llama3" and not family.rope_interleaved):
        raise ChatkitError(f"exporting to GGUF: this model's rotary scaling ({rope['rope_type']}) is not supported; "
                           "models with plain rotary embeddings (and Llama 3's scaling) are")
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


def rotary_rows(array, name: str, config, family: Family):
    """The output rows of a q or k projection in llama.cpp's rotary layout (the Llama graph's); else as they are."""
    if family.rope_interleaved and name.endswith(("q_proj.weight", "q_proj.bias")):
        return interleave_heads(array, config.num_attention_heads)
    if family.rope_interleaved and name.endswith(("k_proj.weight", "k_proj.bias")):
        return interleave_heads(array, config.num_key_value_heads)
    return array


def to_gguf_layout(array, name: str, config, family: Family):
    """One weight (float32 numpy) in llama.cpp's layout: q/k rows interleaved, Gemma norms +1, Conv1D turned."""
    array = rotary_rows(array, name, config, family)
    if family.norm_plus_one and name.endswith("norm.weight"):
        return array + 1.0
    if family.name == "gpt2" and name.endswith(GPT2_CONV1D):
        return array.T
    return array


def gguf_tensors(model, family: Family) -> Dict[str, "object"]:
    """The model's weights under llama.cpp's names and layout, as float32 numpy arrays."""
    import gguf

    config = model.config
    blocks = config.num_hidden_layers if family.name != "gpt2" else config.n_layer
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.gguf_arch), blocks)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {}
    if _rope(config).get("rope_type") == "llama3":
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(config)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # the runtime reuses the token embeddings
        target = gguf_name(names, name)
        if target is None:
            if name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
                continue  # recomputed by every runtime
            raise ChatkitError(f"exporting to GGUF: no GGUF name for the weight {name}")
        array = value.detach().to("cpu").float().numpy()
        tensors[target] = to_gguf_layout(array, name, config, family).copy(order="C")
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


# Room a file needs beyond its tensors: the header, the tokenizer's strings, the alignment padding.
METADATA_ALLOWANCE = 64 * 2**20


def write_file(out: str, architecture: str, describe: Callable, tensors: Dict[str, tuple]) -> None:
    """The one writing sequence: metadata from `describe(writer)`, then the encoded tensors, atomically at `out`.

    The disk's free space is checked first, and a disk that fills while writing is one line (the writer's
    numpy calls give an OSError with no error number), with `out` as it was before."""
    import gguf

    needed = sum(data.nbytes for data, _ in tensors.values())
    folder = Path(out).resolve().parent
    while not folder.exists():  # the folder is made when the file is written
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + min(METADATA_ALLOWANCE, needed // 10):
        raise ChatkitError(f"{out}: the disk has {mib(free)} free and the file needs about {mib(needed)}; "
                           "free some space or write it to another disk")
    with atomic_path(out) as temporary:
        try:
            writer = gguf.GGUFWriter(temporary, architecture)
            writer.add_name(Path(out).stem)
            describe(writer)
            for name, (data, raw_dtype) in tensors.items():
                writer.add_tensor(name, data, raw_dtype=raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except OSError as exc:
            if exc.errno not in (None, errno.ENOSPC, errno.EDQUOT):
                raise
            raise ChatkitError(f"{out}: the disk filled while writing it ({exc.strerror or exc}; it needs about "
                               f"{mib(needed)}); free some space or write it to another disk. Nothing was "
                               "replaced") from None


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size / 1024:,.0f} KiB"


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def merged_model(source: ModelSource):
    """The model on the CPU in float32, with a LoRA adapter merged into its weights (in memory only)."""
    from .device import choose_placement

    loaded = load_model(source, choose_placement("cpu", "float32"))
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = merge_adapter(model)
    return model.eval(), loaded


def training_details(source: ModelSource, tokenizer):
    """The chat template and system prompt the model was trained with (its chatkit.json), else its own."""
    folder = source.path if source.kind in ("adapter", "directory") else None
    info = read_training_info(folder) if folder else {}
    if info.get("chat_template"):
        tokenizer.chat_template = info["chat_template"]
    return ensure_chat_template(tokenizer), info.get("system_prompt")


def exportable_family(spec: str, config) -> Family:
    family = family_of(config)
    if family is None or not family.gguf_arch:
        raise ChatkitError(f"exporting {spec} to GGUF: its architecture {config.model_type!r} is not supported; "
                           f"supported families: {gguf_families()} (docs/README-CHATGPT-TRAINING.md, Models)")
    return family


def write_gguf(spec: str, out: str, kind: str = "f16") -> Exported:
    """Write the model `spec` (anything --model accepts) as one GGUF file at `out` (atomically)."""
    import gguf

    source = resolve_model(spec)
    model, loaded = merged_model(source)
    family = exportable_family(spec, model.config)
    architecture = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.gguf_arch)]
    tokenizer = loaded.tokenizer
    chat_template, system_prompt = training_details(source, tokenizer)
    check_chat_tokens(tokenizer, model.get_input_embeddings().weight.shape[0], spec)
    tensors = gguf_tensors(model, family)
    pre = pre_tokenizer_name(tokenizer, origin_gguf(source))
    def describe(writer):
        writer.add_type(gguf.GGUFType.MODEL)
        add_architecture(writer, model.config, family)
        writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
        if kind == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, chat_template, pre, rows=model.get_input_embeddings().weight.shape[0])

    write_file(out, architecture, describe, {name: encode(array, kind) for name, array in tensors.items()})
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    return Exported(path=out, architecture=architecture, tensors=len(tensors), bytes=os.path.getsize(out),
                    chat_template=chat_template, system_prompt=system_prompt, stops=stops)


LORA_PARTS = {"lora_A": "lora_a", "lora_B": "lora_b"}


def write_lora_gguf(spec: str, out: str, kind: str = "f16") -> Exported:
    """Write the LoRA adapter `spec` (a training output folder) as a llama.cpp LoRA GGUF at `out`.

    llama.cpp adds (alpha / rank) * B @ A to each adapted weight of the base GGUF it is given beside it
    (`--lora`); A and B go in as peft has them, except that B's rows follow the base's layout (q/k rows
    interleaved for the Llama graph)."""
    import gguf
    from peft import get_peft_model_state_dict

    from .device import choose_placement

    source = resolve_model(spec)
    if source.kind != "adapter":
        raise ChatkitError(f"--lora-gguf: {spec} is not a LoRA adapter (a train_chatgpt_model.py output trained "
                           "with LoRA); export it whole with --gguf")
    loaded = load_model(source, choose_placement("cpu", "float32"))
    family = exportable_family(spec, loaded.model.config)
    settings = loaded.model.peft_config["default"]
    if settings.modules_to_save:
        raise ChatkitError(f"--lora-gguf: {spec} also trains whole modules ({', '.join(settings.modules_to_save)}), "
                           "which a llama.cpp LoRA file cannot hold; export the merged model with --gguf")
    if getattr(loaded.model.config, "tie_word_embeddings", False) and any(
            "lm_head" in name for name in get_peft_model_state_dict(loaded.model)):
        raise ChatkitError(f"--lora-gguf: {spec} adapts the output layer of a model whose output layer is its "
                           "input embeddings; a llama.cpp LoRA file cannot hold that (the base GGUF has no output "
                           "layer of its own): export the merged model with --gguf")
    # llama.cpp scales by alpha / rank; rank-stabilised LoRA scales by alpha / sqrt(rank).
    alpha = settings.lora_alpha * (settings.r ** 0.5 if settings.use_rslora else 1.0)
    config = loaded.model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.gguf_arch),
                                     config.num_hidden_layers if family.name != "gpt2" else config.n_layer)
    tensors = {}
    for name, value in get_peft_model_state_dict(loaded.model).items():
        module, part, _ = name.removeprefix("base_model.model.").rsplit(".", 2)
        target = gguf_name(names, module + ".weight")
        if part not in LORA_PARTS or target is None:
            raise ChatkitError(f"--lora-gguf: no llama.cpp name for the adapter weight {name}")
        array = value.detach().float().numpy()
        if part == "lora_B":  # B's rows are the weight's output rows (for GPT-2's Conv1D too: B @ A is (out, in))
            array = rotary_rows(array, module + ".weight", config, family)
        tensors[f"{target}.{LORA_PARTS[part]}"] = array.copy(order="C")
    architecture = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.gguf_arch)]
    def describe(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))

    write_file(out, architecture, describe,
               {name: encode(array, "f32" if kind == "f32" else "f16") for name, array in tensors.items()})
    return Exported(path=out, architecture=architecture, tensors=len(tensors), bytes=os.path.getsize(out),
                    chat_template="", system_prompt=None, stops=[])


def modelfile_text(exported: Exported, settings: Optional[GenerationSettings] = None) -> str:
    """An Ollama Modelfile: the GGUF file, its stop words, the toolkit's sampling defaults, the system prompt.

    Ollama reads the chat template from the GGUF file itself."""
    settings = settings or GenerationSettings()
    lines = [f"FROM ./{Path(exported.path).name}", ""]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in exported.stops]
    lines += [f"PARAMETER temperature {settings.temperature:g}", f"PARAMETER top_p {settings.top_p:g}",
              f"PARAMETER repeat_penalty {settings.repetition_penalty:g}"]
    if exported.system_prompt and modelfile_can_quote(exported.system_prompt):
        lines += ["", f'SYSTEM """{exported.system_prompt}"""']
    elif exported.system_prompt:
        lines += ["", "# The trained system prompt holds three double quotes, or starts or ends with one, which a",
                  "# Modelfile cannot quote; set it in Ollama instead (/set system ...)."]
    return "\n".join(lines) + "\n"


def modelfile_can_quote(text: str) -> bool:
    """Whether `text` fits in a Modelfile's triple-quoted value: Ollama ends the value at the next three quotes."""
    return '"""' not in text and not text.startswith('"') and not text.endswith('"')
