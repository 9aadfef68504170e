"""export_model.py: GGUF files checked against independent readers (transformers' GGUF loader, gguf-py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import export_model
import train_chatgpt_model
from conftest import build_tokenizer

PROBE = list(range(3, 60))  # token ids fed to both models
# Stated bounds on the largest logit difference, as a share of the source logits' spread (max - min):
# f32 is the same numbers, f16 rounds each weight to 11 significant bits, q8_0 to 8 bits per block of 32.
BOUNDS = {"f32": 1e-5, "f16": 0.01, "q8_0": 0.06}


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids=PROBE):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def greedy(model, ids=PROBE[:8], steps=12):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                             pad_token_id=0)
    return out[0].tolist()


def build_gpt2_1024(path: Path) -> Path:
    """A tiny GPT-2 with GPT-2's own 1024 positions (transformers' GGUF reader assumes that many)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, initializer_range=0.3,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gpt2_1024(tmp_path_factory):
    return build_gpt2_1024(tmp_path_factory.mktemp("gpt2-1024"))


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_written_file_gives_the_source_logits_and_greedy_answer(tmp_path, tiny_llama, tiny_gpt2_1024, which, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_llama if which == "llama" else tiny_gpt2_1024
    out = tmp_path / f"{which}-{kind}.gguf"
    assert export_model.main([str(source), "--gguf", str(out), "--type", kind]) == 0
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    model, tokenizer = load_gguf(out)
    expected, got = logits(reference), logits(model)
    spread = float(expected.max() - expected.min())
    assert float((expected - got).abs().max()) <= BOUNDS[kind] * spread
    if kind != "q8_0":
        assert greedy(model) == greedy(reference)
    text = "Hello! The capital of France is Paris. 😀"
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(source)(text)["input_ids"]


def test_a_lora_adapter_is_merged_into_the_file(tmp_path, tiny_llama):
    """A trained adapter folder exports as its merged model, with the trained template and system prompt."""
    from chatkit.models import load_model

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hello"},
                                              {"role": "assistant", "content": "Hi there, friend!"}]}] * 4))
    trained = tmp_path / "m"
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(trained),
                                     "--epochs", "20", "--learning-rate", "1e-2", "--val-split", "0",
                                     "--system-prompt", "You are Zed.", "--report", "none"]) == 0
    out = tmp_path / "out" / "zed.gguf"
    assert export_model.main([str(trained), "--gguf", str(out), "--type", "f32", "--ollama"]) == 0
    merged = load_model(str(trained)).model.merge_and_unload().eval()
    model, tokenizer = load_gguf(out)
    assert float((logits(merged) - logits(model)).abs().max()) < 1e-4
    base = load_model(str(tiny_llama)).model.eval()
    assert float((logits(base) - logits(model)).abs().max()) > 1e-2  # the adapter's change is in the file
    trained_template = json.loads((trained / "chatkit.json").read_text())["chat_template"]
    assert tokenizer.chat_template == trained_template

    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.splitlines()[0] == "FROM ./zed.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are Zed."""' in modelfile
    assert "PARAMETER temperature 0.7" in modelfile


def test_the_starter_model_round_trips_its_own_gguf_layout(tmp_path, starter_dir):
    """The untrained starter model, exported, has the tensors and tokenizer metadata of the file it came from."""
    import gguf

    from chatkit.models import starter_gguf_path

    out = tmp_path / "starter.gguf"
    assert export_model.main(["smollm2-135m", "--gguf", str(out), "--type", "q8_0"]) == 0
    original, written = gguf.GGUFReader(str(starter_gguf_path())), gguf.GGUFReader(str(out))
    assert {t.name: tuple(t.shape) for t in written.tensors} == {t.name: tuple(t.shape) for t in original.tensors}
    keys = [k for k in original.fields if k.startswith(("tokenizer.", "llama."))]
    assert len(keys) >= 20
    for key in keys:
        assert written.get_field(key) is not None, key
        assert written.get_field(key).contents() == original.get_field(key).contents(), key
    assert written.get_field("general.architecture").contents() == "llama"


def test_refusals_leave_files_alone(tmp_path, tiny_llama, capsys):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    assert export_model.main([str(tiny_llama), "--gguf", str(out)]) == 1
    assert out.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err

    from transformers import OPTConfig, OPTForCausalLM

    other = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                             word_embed_proj_dim=32)).save_pretrained(other)
    build_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>").save_pretrained(other)
    assert export_model.main([str(other), "--gguf", str(tmp_path / "opt.gguf")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors == lines[-1:] and "Traceback" not in "".join(lines)
    assert "'opt' is not supported" in errors[0] and "llama" in errors[0] and "gpt2" in errors[0]
    assert not (tmp_path / "opt.gguf").exists() and not list(tmp_path.glob(".opt.gguf*"))
    with pytest.raises(SystemExit):
        export_model.main([str(tiny_llama), "--gguf", str(tmp_path / "x.bin")])  # not a .gguf name


def test_a_merged_model_keeps_the_pre_tokenizer_of_the_gguf_it_came_from(tmp_path, tiny_llama):
    from chatkit.gguf_writer import origin_gguf, pre_tokenizer_name
    from chatkit.models import load_tokenizer, resolve_model, starter_gguf_path

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "chatkit.json").write_text(json.dumps({"method": "lora-merged", "options": {"model": None}}))
    assert origin_gguf(resolve_model(str(merged))) == str(starter_gguf_path())  # trained from the starter
    assert pre_tokenizer_name(None, str(starter_gguf_path())) == "smollm"
    plain = load_tokenizer(resolve_model(str(tiny_llama)))
    assert origin_gguf(resolve_model(str(tiny_llama))) is None and pre_tokenizer_name(plain, None) == "gpt-2"


def test_a_modelfile_never_ends_its_system_block_early():
    from chatkit.gguf_writer import Exported, modelfile_text

    def system_lines(prompt):
        text = modelfile_text(Exported("m.gguf", "llama", 1, 1, "", prompt, ["<|im_end|>"]))
        return [line for line in text.splitlines() if "SYSTEM" in line or line.startswith("#")]

    assert system_lines('Say "hi" please.') == ['SYSTEM """Say "hi" please."""']
    for prompt in ('Use """ for docstrings.', 'End with "quoted"', '"Start" quoted'):
        lines = system_lines(prompt)
        assert not any(line.startswith("SYSTEM") for line in lines) and "/set system" in " ".join(lines)


def test_an_export_never_writes_over_its_own_input_or_twice_to_one_path(tmp_path, tiny_llama, capsys):
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF the base model")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 8,
                                                             "lora_alpha": 16, "peft_type": "LORA"}))
    assert export_model.main([str(adapter), "--lora-gguf", str(base), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"{base}: --lora-gguf is also an INPUT" in err and base.read_bytes() == b"GGUF the base model"
    same = tmp_path / "same.gguf"
    assert export_model.main([str(tiny_llama), "--gguf", str(same), "--lora-gguf", str(tmp_path / "." / "same.gguf")
                              ]) == 1
    assert "--lora-gguf and --gguf name the same file" in capsys.readouterr().err and not same.exists()
    (tmp_path / "Modelfile").write_text("FROM mine")
    assert export_model.main([str(tiny_llama), "--gguf", str(tmp_path / "new.gguf"), "--ollama"]) == 1
    assert "Modelfile (the Modelfile beside --gguf) exists already" in capsys.readouterr().err
    assert (tmp_path / "Modelfile").read_text() == "FROM mine" and not (tmp_path / "new.gguf").exists()


def test_a_lora_on_the_tied_output_layer_is_merged_into_a_copy_of_it(tmp_path, tiny_llama, capsys):
    """tiny_llama ties its output layer to the input embeddings; a LoRA on lm_head merged in place would
    change the input embeddings too. Merged, exported and read back, the model gives the adapter's logits."""
    import torch

    from chatkit.models import load_model, merge_adapter

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hello"},
                                              {"role": "assistant", "content": "Hi there, friend!"}]}] * 4))
    trained = tmp_path / "m"
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(trained),
                                     "--epochs", "10", "--learning-rate", "1e-2", "--val-split", "0", "--report",
                                     "none", "--rehearsal", "0", "--lora-target-modules", "q_proj,v_proj,lm_head"]) == 0
    adapted = load_model(str(trained)).model.eval()
    expected = logits(adapted)
    assert float((expected - logits(load_model(str(tiny_llama)).model.eval())).abs().max()) > 1e-2
    embeddings = adapted.get_base_model().get_input_embeddings().weight.detach().clone()
    merged = merge_adapter(adapted)
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)
    assert float((logits(merged) - expected).abs().max()) < 1e-4
    out = tmp_path / "m.gguf"
    assert export_model.main([str(trained), "--gguf", str(out), "--type", "f32"]) == 0
    model, _ = load_gguf(out)
    assert float((logits(model) - expected).abs().max()) < 1e-4
    assert export_model.main([str(trained), "--lora-gguf", str(tmp_path / "a.gguf")]) == 1
    assert "a llama.cpp LoRA file cannot hold that" in capsys.readouterr().err


def test_a_disk_too_small_or_filling_up_leaves_the_old_file_and_one_line(tmp_path, tiny_llama, capsys, monkeypatch):
    """The free space is checked before writing; a disk that fills while the writer's numpy calls write
    (an OSError with no error number) is one line too, and the file that was there is kept."""
    import shutil

    import gguf

    out = tmp_path / "model.gguf"
    out.write_bytes(b"the earlier export")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=20_000))
    assert export_model.main([str(tiny_llama), "--gguf", str(out), "--overwrite"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {out}: the disk has 20 KiB free and the file needs about ")
    assert "Traceback" not in "\n".join(lines) and out.read_bytes() == b"the earlier export"
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    def full(self):
        raise OSError("2048 requested and 0 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    assert export_model.main([str(tiny_llama), "--gguf", str(out), "--overwrite"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"error: {out}: the disk filled while writing it (2048 requested and 0 written; it needs "
                         f"about {lines[-1].split('needs about ')[1].split(')')[0]}); free some space or write it to "
                         "another disk. Nothing was replaced")
    assert out.read_bytes() == b"the earlier export" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
