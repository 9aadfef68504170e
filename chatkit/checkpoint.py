"""Single-file model checkpoints (`.pt`): safetensors weights with the config and tokenizer inside.

A checkpoint written here is a safetensors file whose metadata carries everything needed to rebuild
the model offline: the base model's name, its config, the tokenizer (tokenizer.json), special tokens
and the chat template. Reading it runs no pickle. A `.pt` made elsewhere with
`torch.save(model.state_dict())` is read too, with `torch.load(weights_only=True)`; a `.pt` holding
any other pickled object is refused. This module only reads and writes the format: building a model
from it is `models.load_model`'s job.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import List, Optional

from .errors import ChatkitError
from .files import atomic_path

FORMAT = "chatkit-causal-lm-v1"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
MIN_WEIGHTS_BYTES = 64  # smaller than any file of weights: an empty or cut file


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
    with atomic_path(path) as temporary:
        save_model(model, temporary, metadata=metadata)


def own_metadata(path: str | os.PathLike) -> Optional[dict]:
    """The metadata of a checkpoint written here, or None for a file of bare weights."""
    path = Path(path)
    if not path.is_file():
        raise ChatkitError(f"{path}: no such file")
    if is_safetensors(path):
        try:
            metadata = read_metadata(path)
        except Exception as exc:  # safetensors' own error type: a header that does not match the file
            raise ChatkitError(f"{path} is damaged: {str(exc).splitlines()[0][:120]}; the file was probably cut "
                               "short while copying or saving. Save or train it again") from None
        if metadata.get("format") == FORMAT:
            return metadata
    return None


def own_config(metadata: dict):
    """The model's transformers config, from a checkpoint's metadata."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(metadata["config"]))


def own_tokenizer(metadata: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(metadata["tokenizer"]),
                                        **json.loads(metadata.get("special_tokens", "{}")))
    tokenizer.chat_template = metadata.get("chat_template") or None
    return tokenizer


def load_own_weights(model, path: str | os.PathLike) -> None:
    from safetensors.torch import load_model

    load_model(model, str(path), strict=False)  # the tied output layer is not stored twice
    model.tie_weights()


def bare_weights(path: str | os.PathLike) -> dict:
    """The state dict of a file of weights made elsewhere (safetensors or a weights-only torch pickle)."""
    path = Path(path)
    if is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    if path.stat().st_size < MIN_WEIGHTS_BYTES:
        raise ChatkitError(f"{path} is damaged or not a model file: it holds only {path.stat().st_size} bytes")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # no class or function named: not an object, just damaged
            raise ChatkitError(f"{path} is damaged or not a model file ({str(exc).splitlines()[0][:120]})") from None
        raise ChatkitError(
            f"{path}: refusing to load it: it holds a pickled Python object, not only weights, and unpickling "
            f"could run code. Re-save it with torch.save(model.state_dict(), ...) or use a model directory"
        ) from None
    except (RuntimeError, AttributeError, TypeError, EOFError, ValueError, KeyError, IndexError, OverflowError,
            UnicodeDecodeError, MemoryError) as exc:  # what the unpickler raises on random bytes
        raise ChatkitError(f"{path} is damaged or not a model file ({type(exc).__name__}); the file may have "
                           "been cut short while copying or saving") from None
    if isinstance(state, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise ChatkitError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return state


def fit_weights(model, state: dict) -> List[str]:
    """Load a state dict saved from this kind of model (or its inner body); returns the names still missing."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    own = model.state_dict()
    if not any(k in own for k in state):  # saved from the inner model (GPT2Model) rather than the LM
        prefix = model.base_model_prefix + "."
        state = {prefix + k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    return [k for k in result.missing_keys if not k.endswith("lm_head.weight")]  # tied to the embeddings
