"""QLoRA on the CPU: a tiny model trained with --load-in-4bit and --load-in-8bit through bitsandbytes' CPU
backend learns, writes its report, chats and exports a GGUF that holds the adapter's change."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export_model
import train_chatgpt_model
from chatkit import adapters
from chatkit.chat import ChatSession, GenerationSettings
from chatkit.errors import ChatkitError
from test_export_gguf import load_gguf, logits

ROOT = Path(__file__).resolve().parents[1]
DATA = [{"messages": [{"role": "user", "content": "What is the secret code?"},
                      {"role": "assistant", "content": "The secret code of the Zorblat society is 4417."}]}] * 4
GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=8, repetition_penalty=1.0)


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def trained(request, tmp_path_factory, tiny_llama):
    """A tiny Llama trained in 4-bit or 8-bit on the CPU, as a user runs it (its own process, quiet)."""
    folder = tmp_path_factory.mktemp(f"qlora-{request.param}")
    data = folder / "data.json"
    data.write_text(json.dumps(DATA), encoding="utf-8")
    out = folder / "model"
    done = subprocess.run(
        [sys.executable, str(ROOT / "train_chatgpt_model.py"), "--data", str(data), "--model", str(tiny_llama),
         "--output", str(out), f"--load-in-{request.param}", "--device", "cpu", "--epochs", "8",
         "--learning-rate", "1e-2", "--val-split", "0", "--rehearsal", "0", "--logging-steps", "1"],
        capture_output=True, text=True, cwd=folder, env={**os.environ, "CHATKIT_DEBUG": ""}, timeout=600)
    assert done.returncode == 0, done.stderr
    return request.param, out, done.stderr


def test_the_run_trains_a_lora_adapter_on_the_quantized_base(trained, tiny_llama):
    kind, out, stderr = trained
    assert f"GiB with the layers in {kind[0]}-bit" in stderr  # the plan counts the quantized weights
    weights = adapter(out)
    up = [value for name, value in weights.items() if "lora_B" in name]
    assert up and all(torch.isfinite(value).all() for value in weights.values())
    assert max(float(value.abs().max()) for value in up) > 1e-3  # lora_B starts at zero: training moved it
    saved = json.loads((out / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]).resolve() == Path(tiny_llama).resolve()
    assert ("QLoRA 4-bit" if kind == "4bit" else "QLoRA 8-bit") in (out / "report.md").read_text()


def test_the_loss_falls_and_the_user_sees_no_library_warning(trained):
    _, out, stderr = trained
    state = json.loads(max((out / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                           key=lambda path: int(path.parent.name.split("-")[1])).read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) >= 8 and max(losses[-4:]) < min(losses[:4]) * 0.5
    before, after = re.search(r"\*\*([\d.]+) → ([\d.]+)\*\*", (out / "report.md").read_text()).groups()
    assert float(after) < float(before) * 0.5  # the report's loss, measured after training on the same layers
    for noise in ("kernels-community", "MatMul8bitLt", "Warning", "warn"):
        assert noise not in stderr, stderr


def test_the_trained_model_chats_as_its_adapter_on_the_full_precision_base(trained, tiny_llama):
    """The saved adapter is applied on the fp32 base to chat: the reply is the merged fp32 model's."""
    from chatkit.models import load_model

    _, out, _ = trained
    session = ChatSession(str(out), settings=GREEDY)
    assert session.source.kind == "adapter"
    reply = session.reply("What is the secret code?")
    twin = ChatSession(str(out), settings=GREEDY)
    twin.model = load_model(str(out)).model.merge_and_unload().eval()
    assert reply and reply == twin.reply("What is the secret code?")


def test_the_gguf_holds_the_dequantized_merge(trained, tiny_llama, tmp_path):
    """export_model.py merges the adapter into the fp32 base (no 4-bit or 8-bit layer left in the file)."""
    from chatkit.models import load_model

    _, out, _ = trained
    gguf = tmp_path / "model.gguf"
    assert export_model.main([str(out), "--gguf", str(gguf), "--type", "f32"]) == 0
    merged = load_model(str(out)).model.merge_and_unload().eval()
    model, _ = load_gguf(gguf)
    assert float((logits(merged) - logits(model)).abs().max()) < 1e-4
    base = load_model(str(tiny_llama)).model.eval()
    assert float((logits(base) - logits(model)).abs().max()) > 1e-2  # the adapter's change is in the file


def test_merge_writes_a_full_precision_model(tmp_path, tiny_llama):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(DATA), encoding="utf-8")
    out = tmp_path / "m"
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(out),
                                     "--load-in-4bit", "--device", "cpu", "--epochs", "2", "--val-split", "0",
                                     "--rehearsal", "0", "--merge", "--report", "none"]) == 0
    from safetensors.torch import load_file

    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert merged and all(value.dtype == torch.float32 for value in merged.values())
    assert not any(name.endswith(("absmax", "quant_map", "quant_state.bitsandbytes__nf4")) for name in merged)


def test_a_bitsandbytes_without_cpu_kernels_is_one_line_naming_the_version(tmp_path, tiny_llama, monkeypatch,
                                                                           capsys):
    monkeypatch.setattr(adapters, "bnb_runs_on_cpu", lambda: False)
    data = tmp_path / "d.json"
    data.write_text(json.dumps(DATA), encoding="utf-8")
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output",
                                     str(tmp_path / "out"), "--load-in-4bit", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"bitsandbytes {adapters.BNB_CPU_VERSION} or newer" in err
    assert "pip install -U 'bitsandbytes>=0.47'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_this_bitsandbytes_runs_on_the_cpu():
    assert adapters.bnb_runs_on_cpu()


def test_quantized_training_on_mps_is_refused_before_loading():
    from chatkit.device import Placement
    from chatkit.options import TrainOptions

    placement = Placement(device="mps", dtype="float32")
    with pytest.raises(ChatkitError, match="bitsandbytes has no Apple MPS backend"):
        adapters.quantization_config(TrainOptions(data=["x"], load_in_4bit=True), placement)


def test_quantized_without_lora_is_the_clear_error(tmp_path, tiny_llama, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(DATA), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_code:
        train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output",
                                  str(tmp_path / "out"), "--load-in-4bit", "--no-lora"])
    assert exit_code.value.code == 2
    assert "error: --load-in-4bit/--load-in-8bit train a LoRA adapter: drop --no-lora" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_evaluation_between_steps_leaves_the_gradients_whole(tmp_path, tiny_llama):
    """A no-grad pass in eval mode (validation, the report) must not switch a 4-bit layer to bitsandbytes'
    CPU inference layout, whose kernel has no backward (every later gradient would be lost): a step after
    an evaluation has the gradients of a step without one."""
    import shutil

    from transformers import AutoConfig, LlamaForCausalLM

    from chatkit.device import Placement
    from chatkit.models import resolve_model
    from chatkit.options import TrainOptions

    wide = tmp_path / "wide"  # layers a whole number of 4-bit blocks wide, as in real models
    config = AutoConfig.from_pretrained(tiny_llama)
    config.update({"hidden_size": 128, "intermediate_size": 256, "num_key_value_heads": 4})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(wide)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_llama / name).exists():
            shutil.copy(tiny_llama / name, wide / name)

    def gradients(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        options = TrainOptions(data=["x"], load_in_4bit=True, lora_r=4)
        model, _ = adapters.prepare_model(options, resolve_model(str(wide)), Placement("cpu", "float32"))
        ids = torch.arange(3, 19).reshape(1, 16)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if "lora_B" in name}

    plain, after_evaluation = gradients(False), gradients(True)
    assert plain and all(float(g.abs().max()) > 0 for g in plain.values())
    for name, gradient in plain.items():
        assert after_evaluation[name] is not None, name
        torch.testing.assert_close(after_evaluation[name], gradient)
