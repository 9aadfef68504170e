"""Single-file model checkpoints (`.pt`): safetensors weights with the config and tokenizer inside.

A checkpoint written here is a safetensors file whose metadata carries everything needed to rebuild
the model offline: the base model's name, its config, the tokenizer (tokenizer.json), special tokens
and the chat template. Loading it runs no pickle. A `.pt` made elsewhere with
`torch.save(model.state_dict())` loads too, with `torch.load(weights_only=True)`, onto a base model
the caller names; a `.pt` holding any other pickled object is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Optional

from .errors import ChatkitError

FORMAT = "chatkit-causal-lm-v1"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_safetensors(path: str | os.PathLike) -> bool:
    """A safetensors file starts with an 8-byte header length and a JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length < os.path.getsize(path)


def read_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def is_chatkit_checkpoint(path: str | os.PathLike) -> bool:
    return is_safetensors(path) and read_metadata(path).get("format") == FORMAT


def save_checkpoint(model, tokenizer, path: str | os.PathLike, base_model: str) -> None:
    """Write model + config + tokenizer into one safetensors file, atomically."""
    from safetensors.torch import save_model

    special = {key: str(value) for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    metadata = {
        "format": FORMAT,
        "base_model": base_model,
        "config": model.config.to_json_string(),
        "tokenizer": tokenizer.backend_tokenizer.to_str(),
        "special_tokens": json.dumps(special),
        "chat_template": tokenizer.chat_template or "",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".part")
    save_model(model, str(temporary), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # an ordinary file, as the user's other files
    os.replace(temporary, path)


def load_checkpoint(path: str | os.PathLike, base=None, placement=None):
    """(model, tokenizer, base model name) from a checkpoint; `base` (a ModelSource or name) for bare weights."""
    path = Path(path)
    if not path.is_file():
        raise ChatkitError(f"{path}: no such file")
    if is_safetensors(path):
        metadata = read_metadata(path)
        if metadata.get("format") == FORMAT:
            return _load_own(path, metadata, placement)
        return _load_onto_base(path, _safetensors_state(path), base, placement)
    return _load_onto_base(path, _torch_state(path), base, placement)


def _load_own(path: Path, metadata: dict, placement):
    from safetensors.torch import load_model
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config_dict = json.loads(metadata["config"])
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    load_model(model, str(path), strict=False)
    model.tie_weights()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(metadata["tokenizer"]),
                                        **json.loads(metadata.get("special_tokens", "{}")))
    tokenizer.chat_template = metadata.get("chat_template") or None
    _place(model, placement)
    return model, tokenizer, metadata.get("base_model")


def _safetensors_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _torch_state(path: Path) -> dict:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as exc:
        raise ChatkitError(
            f"{path}: refusing to load it: it holds a pickled Python object, not only weights, and unpickling "
            f"could run code ({type(exc).__name__}). Re-save it with torch.save(model.state_dict(), ...) or "
            "use a model directory"
        ) from None
    if isinstance(state, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise ChatkitError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return state


def _load_onto_base(path: Path, state: dict, base, placement):
    from .models import load_model, resolve_model

    if base is None:
        raise ChatkitError(
            f"{path} holds only weights, without the model they belong to; name the base model "
            "(for example GPT2Chatbot(model_name=\"gpt2-small (124M)\").load_model(path))"
        )
    loaded = load_model(base if not isinstance(base, str) else resolve_model(base), placement)
    model = loaded.model
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    own = model.state_dict()
    if not any(k in own for k in state):  # saved from the inner model (GPT2Model) rather than the LM
        prefix = model.base_model_prefix + "."
        state = {prefix + k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ChatkitError(
            f"{path}: these weights do not fit {loaded.source.describe()} ({len(missing)} missing, e.g. "
            f"{missing[0]}); name the model they were trained from"
        )
    model.tie_weights()
    return model, loaded.tokenizer, loaded.source.spec


def _place(model, placement) -> None:
    if placement is not None:
        model.to(device=placement.device, dtype=placement.torch_dtype)
    model.eval()
