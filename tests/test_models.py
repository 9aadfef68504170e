"""The one `--model` resolver: every kind of value, loading, and its error messages."""

import json
import time

import pytest
import torch

from chatkit import files, models
from chatkit.device import Placement
from chatkit.errors import ChatkitError

CPU = Placement("cpu", "float32")


@pytest.mark.parametrize(
    "spec, hub_id",
    [
        ("gpt2-small (124M)", "openai-community/gpt2"),
        ("gpt2-medium (355M)", "openai-community/gpt2-medium"),
        ("gpt2-large (774M)", "openai-community/gpt2-large"),
        ("gpt2-xl (1558M)", "openai-community/gpt2-xl"),
        ("GPT2-small", "openai-community/gpt2"),
        ("microsoft/DialoGPT-medium", "microsoft/DialoGPT-medium"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ],
)
def test_hub_ids_and_friendly_names(spec, hub_id):
    source = models.resolve_model(spec)
    assert (source.kind, source.path) == ("hub", hub_id)


def test_starter_model_comes_from_the_package():
    source = models.resolve_model("smollm2-135m")
    assert source.kind == "gguf" and source.gguf_file.endswith(".gguf")
    assert models.resolve_model(None).gguf_file == source.gguf_file  # the default model


def test_starter_model_falls_back_to_hub_id_without_package(monkeypatch):
    monkeypatch.setattr(models, "starter_gguf_path", lambda: None)
    source = models.resolve_model("smollm2-135m")
    assert (source.kind, source.path) == ("hub", models.STARTER_HUB_ID)


def test_local_directory(tiny_llama):
    source = models.resolve_model(str(tiny_llama))
    assert (source.kind, source.path) == ("directory", str(tiny_llama))
    loaded = models.load_model(source, CPU)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.eos_token == "<|im_end|>"


def test_adapter_directory_loads_its_base(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / files.TRAINING_INFO_FILE).write_text(json.dumps({"base_model": str(tiny_llama)}))

    source = models.resolve_model(str(adapter))
    assert source.kind == "adapter" and source.base.path == str(tiny_llama)
    loaded = models.load_model(source, CPU)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, peft_model(ids).logits)
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
    assert not torch.allclose(loaded.model(ids).logits, plain)  # the adapter was applied


def test_adapter_without_chatkit_info_uses_adapter_config(tiny_llama, tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_llama)}))
    assert models.resolve_model(str(adapter)).base.kind == "directory"


def test_gguf_file_is_converted_once_and_then_loads_fast(starter_dir):
    gguf = models.starter_gguf_path()
    source = models.resolve_model(str(gguf))
    assert source.kind == "gguf"
    assert models.local_path(source) == str(starter_dir)
    assert (starter_dir / "model.safetensors").is_file()
    start = time.perf_counter()
    loaded = models.load_model("smollm2-135m", CPU)
    assert time.perf_counter() - start < 15  # the cached directory, not a second conversion
    assert loaded.model.dtype == torch.float32
    assert "<|im_start|>" in loaded.tokenizer.chat_template


def test_offline_hub_error_names_model_and_way_out():
    with pytest.raises(ChatkitError) as info:
        models.load_model("someone/no-such-model-here", CPU)
    message = str(info.value)
    assert "'someone/no-such-model-here'" in message and "--model /local/path" in message


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("./missing-dir", "--model ./missing-dir: no such file or directory"),
        ("/nowhere/model.gguf", "no such file or directory"),
        ("not a model!", "is not a known model name"),
    ],
)
def test_bad_model_values(spec, fragment):
    with pytest.raises(ChatkitError, match=fragment):
        models.resolve_model(spec)


def test_directory_without_model_files(tmp_path):
    with pytest.raises(ChatkitError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_non_model_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(b"x")
    with pytest.raises(ChatkitError, match="only .gguf and .pt checkpoint files load directly"):
        models.resolve_model(str(path))
