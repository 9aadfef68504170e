"""Every family in chatkit.families: template rules, exact labels, and train -> chat -> report -> export -> reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import export_model
import train_chatgpt_model
from chatkit.families import FAMILIES, family_of
from conftest import train_replies
from family_models import BUILDERS, GEMMA2_TEMPLATE, MISTRAL_TEMPLATE

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
REPLIES = {"What is the Zorblat code?": "The code is 4417.", "Tell me a joke": "Why did the computer go to the doctor?"}
FOLDING = {"gemma2", "mistral"}  # templates that refuse a system message


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = BUILDERS[name][0](tmp_path_factory.mktemp(name) / name)
        return built[name]

    return get


def tokenizer_of(path, family=None):
    from transformers import AutoTokenizer

    from chatkit.formatting import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tokenizer, family)
    return tokenizer


def test_every_family_row_has_a_test_model():
    assert {family.name for family in FAMILIES} <= {family_of(name).name if family_of(name) else name
                                                   for name in ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text",
                                                                "phi3", "mistral", "gpt2")}
    assert {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mistral", "gpt2"} <= set(BUILDERS)


def test_each_architecture_has_its_converter_registered_as_llama_cpp_registers_them(family_dirs):
    """One converter class per architecture, found by the model's Hugging Face architecture; the families that
    share llama.cpp's Llama graph (SmolLM, Llama 3, Mistral) share its class."""
    from transformers import AutoModelForCausalLM

    from chatkit import ggufconvert
    from chatkit.families import gguf_families

    graphs = {}
    for name in BUILDERS:
        model = AutoModelForCausalLM.from_pretrained(family_dirs(name))
        converter = ggufconvert.converter_for(model)
        assert type(converter) is ggufconvert.CONVERTERS[model.config.architectures[0]]
        graphs[name] = converter.graph
    assert graphs == {"llama": "LLAMA", "llama3": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
                      "gemma2": "GEMMA2", "gemma3": "GEMMA3", "phi3": "PHI3", "gpt2": "GPT2"}
    assert gguf_families(ggufconvert.converts) == ", ".join(family.name for family in FAMILIES)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_labels_are_exactly_the_answers_and_their_end_of_turn(family_dirs, name):
    """Token by token: the trained tokens are each answer and the token closing it, nothing else."""
    from transformers import AutoConfig

    from chatkit.formatting import IGNORE_INDEX, stop_token_ids, template_rules, tokenize_conversation

    path = family_dirs(name)
    family = family_of(AutoConfig.from_pretrained(path))
    tokenizer = tokenizer_of(path, family)
    rules = template_rules(tokenizer)
    assert (rules.system_role, rules.alternating) == (family.system_role, family.alternating)

    ids, labels = tokenize_conversation(CONVERSATION, tokenizer)
    end_of_turn = BUILDERS[name][1]
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    runs, run = [], []  # the contiguous runs of trained positions
    for position, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            run.append(position)
        elif run:
            runs, run = runs + [run], []
    assert len(runs) == 2  # one per answer: no prompt, role tag or system text is trained
    for run, answer in zip(runs, ("Hello! How can I help?", "Paris.")):
        assert tokenizer.decode([ids[i] for i in run[:-1]]).strip() == answer  # the answer's tokens
        assert ids[run[-1]] == eot_id  # then the token that closes it
        assert not tokenizer.decode([ids[run[0] - 1]]).strip().endswith(answer[0])  # none of it in the prompt
    assert all(labels[i] in (ids[i], IGNORE_INDEX) for i in range(len(ids)))
    assert eot_id in stop_token_ids(tokenizer)


def test_qwen3_trains_with_thinking_switched_off_in_every_answer(family_dirs):
    """Qwen3's own template drops older answers' thinking blocks; training uses one that keeps them all."""
    from chatkit.families import QWEN3_TRAINING_TEMPLATE, family_of
    from chatkit.formatting import render

    own = tokenizer_of(family_dirs("qwen3"))
    one, two = CONVERSATION[:3], CONVERSATION
    assert not render(two, own).startswith(render(one, own))  # the reason
    trained = tokenizer_of(family_dirs("qwen3"), family_of("qwen3"))
    assert trained.chat_template == QWEN3_TRAINING_TEMPLATE
    assert render(two, trained).count("<think>\n\n</think>\n\n") == 2
    assert render(one, trained, add_generation_prompt=False).startswith(
        render(one[:2], trained, add_generation_prompt=True))


def test_a_template_that_refuses_the_data_gets_the_documented_treatment(family_dirs):
    """Gemma 2 has no system role (folded into the first user turn); Mistral needs alternating roles (merged)."""
    from chatkit.formatting import FOLDED_SYSTEM, MERGED_TURNS, fit_to_template, render

    gemma = tokenizer_of(family_dirs("gemma2"))
    assert gemma.chat_template == GEMMA2_TEMPLATE
    fitted, notes = fit_to_template(CONVERSATION, gemma)
    assert notes == [FOLDED_SYSTEM]
    assert fitted[0] == {"role": "user", "content": "You are terse.\n\nHi there"}
    assert render(CONVERSATION, gemma).startswith("<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>")

    mistral = tokenizer_of(family_dirs("mistral"))
    assert mistral.chat_template == MISTRAL_TEMPLATE
    doubled = [{"role": "user", "content": "One."}, {"role": "user", "content": "Two?"},
               {"role": "assistant", "content": "Yes."}, {"role": "assistant", "content": "And no."}]
    fitted, notes = fit_to_template(doubled, mistral)
    assert notes == [MERGED_TURNS]
    assert fitted == [{"role": "user", "content": "One.\n\nTwo?"}, {"role": "assistant", "content": "Yes.\n\nAnd no."}]
    assert render(doubled, mistral) == "<s>[INST] One.\n\nTwo? [/INST]Yes.\n\nAnd no.</s>"


@pytest.mark.parametrize("bad, says", [
    ("{% for message in messages %}{{ message['content'] }", "line 1"),  # unclosed tag
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),  # the sandbox refuses
])
def test_a_broken_template_is_one_error_line_naming_the_file(tmp_path, tiny_llama, capsys, bad, says):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = bad
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": CONVERSATION}]))
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(model), "--output",
                                     str(tmp_path / "out"), "--epochs", "1"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(model / "tokenizer_config.json") in lines[-1]
    assert says in lines[-1] and "Traceback" not in "\n".join(lines)
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def gguf_field(path: Path, key: str):
    import gguf

    field = gguf.GGUFReader(str(path)).get_field(key)
    return field.contents() if field is not None else None


def check_adapter_file(adapter: Path, base: Path, merged: Path) -> int:
    """base + (alpha / rank) * B @ A, read back from the three files, is the merged file's weight."""
    import gguf
    import numpy as np

    lora = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(adapter)).tensors}
    whole = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(base)).tensors}
    done = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(merged)).tensors}
    alpha = gguf_field(adapter, "adapter.lora.alpha")
    checked = 0
    for name in (n[:-len(".lora_a")] for n in lora if n.endswith(".lora_a")):
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        expected = whole[name] + (alpha / a.shape[0]) * (b @ a)
        assert np.abs(expected - done[name]).max() < 1e-4, name
        checked += 1
    return checked


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_train_chat_report_export_reload(tmp_path, family_dirs, name, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from chatkit.chat import ChatSession, GenerationSettings
    from chatkit.formatting import FOLDED_SYSTEM
    from chatkit.models import load_model

    base = family_dirs(name)
    trained = train_replies(tmp_path, base, REPLIES, "--system-prompt", "You are Zed.")
    err = capsys.readouterr().err
    assert (FOLDED_SYSTEM in err) == (name in FOLDING)
    greedy = GenerationSettings(temperature=0, max_new_tokens=24, repetition_penalty=1.0)

    # chat: the taught answers, and the key/value cache reused across turns gives what recomputing gives
    session = ChatSession(str(trained), settings=greedy)
    taught = []
    for question in REPLIES:
        session.reset()
        taught.append(session.reply(question))
    assert taught == list(REPLIES.values())
    turns = list(REPLIES) + ["Hi there", next(iter(REPLIES))]
    conversations = []
    for reuse in (True, False):
        session = ChatSession(session.loaded, settings=greedy, reuse_cache=reuse)
        conversations.append([session.reply(text) for text in turns])
    assert conversations[0] == conversations[1]

    # the report shows the trained answer
    report = (trained / "report.md").read_text()
    assert "The code is 4417." in report or "Why did the computer go to the doctor?" in report

    # export: the whole model and the adapter alone
    out, adapter, plain = tmp_path / "x.gguf", tmp_path / "x-lora.gguf", tmp_path / "base.gguf"
    assert export_model.main([str(trained), "--gguf", str(out), "--type", "f32", "--lora-gguf", str(adapter),
                              "--ollama"]) == 0
    assert export_model.main([str(base), "--gguf", str(plain), "--type", "f32"]) == 0
    info = json.loads((trained / "chatkit.json").read_text())
    assert gguf_field(out, "tokenizer.chat_template") == info["chat_template"]
    assert check_adapter_file(adapter, plain, out) >= 2
    modelfile = (tmp_path / "Modelfile").read_text()
    assert f'PARAMETER stop "{BUILDERS[name][1]}"' in modelfile

    merged = load_model(str(trained)).model.merge_and_unload().eval()
    if name == "llama3":  # transformers' GGUF reader ignores the rotary divisors: check them directly
        import gguf
        import numpy as np

        factors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}["rope_freqs.weight"]
        head_dim = merged.config.hidden_size // merged.config.num_attention_heads
        plain_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        assert torch.allclose(merged.model.rotary_emb.inv_freq, plain_freq / torch.tensor(factors), rtol=1e-5)
        return
    reader = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    probe = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        assert float((merged(probe).logits - reader(probe).logits).abs().max()) < 1e-4

    # reload: the toolkit chats with its own GGUF file and answers as the trained model did
    session = ChatSession(str(out), settings=greedy, system_prompt="You are Zed.")
    assert session.reply(next(iter(REPLIES))) == next(iter(REPLIES.values()))


@pytest.mark.parametrize("name", ["qwen2", "phi3"])
def test_a_vocabulary_padded_past_the_tokenizer_is_written_with_one_token_per_row(tmp_path, family_dirs, name):
    """Qwen2.5 and Phi-3 have more embedding rows than tokens: the GGUF lists unused [PADn] tokens up to the
    rows, as llama.cpp's converter writes them (bench/gguf_families.py runs these files in llama.cpp)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    rows = AutoConfig.from_pretrained(family_dirs(name)).vocab_size
    tokens = len(AutoTokenizer.from_pretrained(family_dirs(name)))
    assert rows > tokens
    out = tmp_path / "padded.gguf"
    assert export_model.main([str(family_dirs(name)), "--gguf", str(out), "--type", "f32"]) == 0
    reader = gguf.GGUFReader(str(out))
    listed = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert len(listed) == len(types) == rows == int(embedding.shape[-1])
    assert listed[-1] == f"[PAD{rows - 1}]" and set(types[tokens:]) == {int(gguf.TokenType.UNUSED)}


@pytest.mark.parametrize("name, untie", [("qwen3", True), ("mistral", False)])
def test_the_toolkit_reads_back_its_gguf_whatever_the_folder_is_called(tmp_path, family_dirs, name, untie):
    """A Qwen3 with an output layer of its own, and a Mistral GGUF in a folder called `mistral` (the name
    transformers' reader once took for the model's type): both load for chat with the source's logits."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from chatkit.chat import ChatSession

    source = family_dirs(name)
    if untie:
        copy = tmp_path / "source"
        shutil.copytree(source, copy)
        model = AutoModelForCausalLM.from_pretrained(copy)
        model.config.tie_word_embeddings = False
        torch.manual_seed(1)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() +
                                                  0.05 * torch.randn_like(model.lm_head.weight))
        model.save_pretrained(copy)
        source = copy
    folder = tmp_path / name
    folder.mkdir()
    out = folder / f"{name}.gguf"
    assert export_model.main([str(source), "--gguf", str(out), "--type", "f32"]) == 0
    expected = AutoModelForCausalLM.from_pretrained(source).eval()
    session = ChatSession(str(out))
    probe = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        assert float((expected(probe).logits - session.model(probe).logits).abs().max()) < 1e-4
    assert session.reply("Hello") is not None
