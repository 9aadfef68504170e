"""Writing a model as one GGUF file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile.

The file holds what a runtime needs to use the model on its own: the architecture's numbers and the
weights in llama.cpp's layout (the architecture's converter, ggufconvert.py), the tokenizer (tokens, their
kinds, merges, special ids) and the chat template the model was trained with. Names, keys and the
Q8_0 encoding come from the `gguf` package, which llama.cpp maintains. One writing sequence
(`write_file`) serves the model and the LoRA file.
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
from .families import gguf_families
from .files import atomic_path, read_training_info
from .formatting import check_chat_tokens, ensure_chat_template, stop_token_ids
from .ggufconvert import Converter, converter_for, converts, gguf_name, gguf_tensors, tensor_names
from .models import ModelSource, load_model, merge_adapter, resolve_model
from .options import STARTER_MODEL, GenerationSettings

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


def exportable(spec: str, model) -> Converter:
    """The converter of a model llama.cpp can run; one error line naming the families it can, else."""
    if not converts(getattr(model.config, "model_type", None)):
        raise ChatkitError(f"exporting {spec} to GGUF: its architecture {model.config.model_type!r} is not supported; "
                           f"supported families: {gguf_families(converts)} (docs/README-CHATGPT-TRAINING.md, Models)")
    return converter_for(model)


def write_gguf(spec: str, out: str, kind: str = "f16") -> Exported:
    """Write the model `spec` (anything --model accepts) as one GGUF file at `out` (atomically)."""
    import gguf

    source = resolve_model(spec)
    model, loaded = merged_model(source)
    converter = exportable(spec, model)
    architecture = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, converter.graph)]
    tokenizer = loaded.tokenizer
    chat_template, system_prompt = training_details(source, tokenizer)
    check_chat_tokens(tokenizer, model.get_input_embeddings().weight.shape[0], spec)
    tensors = gguf_tensors(model)
    pre = pre_tokenizer_name(tokenizer, origin_gguf(source))
    def describe(writer):
        writer.add_type(gguf.GGUFType.MODEL)
        converter.add_parameters(writer)
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
    converter = exportable(spec, loaded.model)
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
    names = tensor_names(converter)
    tensors = {}
    for name, value in get_peft_model_state_dict(loaded.model).items():
        module, part, _ = name.removeprefix("base_model.model.").rsplit(".", 2)
        target = gguf_name(names, module + ".weight")
        if part not in LORA_PARTS or target is None:
            raise ChatkitError(f"--lora-gguf: no llama.cpp name for the adapter weight {name}")
        array = value.detach().float().numpy()
        if part == "lora_B":  # B's rows are the weight's output rows, in the graph's layout
            array = converter.rows(array, module + ".weight")
        tensors[f"{target}.{LORA_PARTS[part]}"] = array.copy(order="C")
    architecture = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, converter.graph)]
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
