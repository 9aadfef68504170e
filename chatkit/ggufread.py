"""A GGUF file read as a transformers model: converted once into a cached folder (float32 safetensors and
the tokenizer), which loads in well under a second afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import ChatkitError
from .files import cache_dir
from .output import no_library_bars, quiet_transformers


@contextlib.contextmanager
def _name_unread():
    """transformers' GGUF reader, for the block, as if the file had no general.name."""
    from transformers import modeling_gguf_pytorch_utils as reader

    original = reader.read_field
    reader.read_field = lambda gguf, field: [] if field == "general.name" else original(gguf, field)
    try:
        yield
    finally:
        reader.read_field = original


def convert_gguf(gguf_file: str | os.PathLike) -> Path:
    """Convert a GGUF file once into a cached model directory (fp32 safetensors + tokenizer).

    Dequantizing GGUF takes tens of seconds; loading the cached directory takes well under one.
    The cache key covers the file's path, size and modification time.
    """
    gguf_file = Path(gguf_file).resolve()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_file.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    print(f"Converting {gguf_file.name} to a cached model directory (once; about 20 s)...", file=sys.stderr)
    folder, name = str(gguf_file.parent), gguf_file.name
    def read():
        with no_library_bars():  # transformers draws the dequantizing bar with tqdm itself
            return (AutoTokenizer.from_pretrained(folder, gguf_file=name),
                    AutoModelForCausalLM.from_pretrained(folder, gguf_file=name))

    try:
        try:
            tokenizer, model = read()
        except NotImplementedError:
            # transformers takes a llama-architecture file whose general.name is "mistral" for a model type
            # gguf-py does not have; read without the name, the file is the llama graph it says it is
            with _name_unread():
                tokenizer, model = read()
    except NotImplementedError as exc:
        raise ChatkitError(f"{gguf_file}: transformers cannot read this GGUF file ({str(exc).splitlines()[0][:160]}); "
                           "llama.cpp, Ollama and LM Studio run it, or load the model folder it was exported from"
                           ) from None
    except ImportError as exc:
        raise ChatkitError(f"loading {gguf_file} needs the `gguf` package: pip install gguf ({exc})") from None
    except (OSError, ValueError) as exc:
        raise ChatkitError(f"could not read GGUF file {gguf_file}: {exc}") from None
    # A GGUF-loaded model carries a quantizer marker that refuses save_pretrained, although the
    # weights are already dequantized to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({"gguf_file": str(gguf_file)}) + "\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
