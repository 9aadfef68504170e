"""A run repeated: chatkit.json and the model card record what the run needs to be repeated, and the same
command twice on the CPU gives the same adapter, bit for bit."""

from __future__ import annotations

import hashlib
import json

import train_chatgpt_model as cli

CONVERSATIONS = [{"messages": [{"role": "user", "content": f"What is fact number {i}?"},
                               {"role": "assistant", "content": f"Fact {i} is that the code is {4400 + i}."}]}
                 for i in range(10)]


def run(tmp_path, model, output, *flags):
    data = tmp_path / "data.json"
    if not data.exists():
        data.write_text(json.dumps(CONVERSATIONS))
    assert cli.main(["--data", str(data), "--model", str(model), "--output", str(tmp_path / output),
                     "--epochs", "2", "--batch-size", "2", "--learning-rate", "5e-3", "--lora-dropout", "0.1",
                     "--report", "none", "--seed", "7", *flags]) == 0
    return tmp_path / output


def weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_the_same_command_twice_gives_the_same_adapter_bit_for_bit(tmp_path, tiny_llama):
    import torch

    first, second = run(tmp_path, tiny_llama, "a"), run(tmp_path, tiny_llama, "b")
    one, two = weights(first), weights(second)
    assert one.keys() == two.keys() and len(one) >= 4
    for name in one:
        assert torch.equal(one[name], two[name]), name
    other = weights(run(tmp_path, tiny_llama, "c", "--seed", "8"))  # the seed is what makes them equal
    assert any(not torch.equal(one[name], other[name]) for name in one)


def test_chatkit_json_and_the_model_card_carry_the_versions_the_data_and_the_seed(tmp_path, tiny_llama):
    import peft
    import torch
    import transformers

    from chatkit import __version__

    output = run(tmp_path, tiny_llama, "a")
    record = json.loads((output / "chatkit.json").read_text())["reproducibility"]
    assert record["seed"] == 7 and record["conversations"] == {"trained": 9, "validation": 1}
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["versions"]["transformers"] == transformers.__version__
    assert record["versions"]["peft"] == peft.__version__ and record["versions"]["chatkit"] == __version__
    data = (tmp_path / "data.json").read_bytes()
    assert record["data"] == [{"file": str(tmp_path / "data.json"), "sha256": hashlib.sha256(data).hexdigest(),
                               "bytes": len(data)}]
    card = (output / "README.md").read_text()
    assert "## Reproduce" in card and "Seed 7;" in card and hashlib.sha256(data).hexdigest() in card
    assert str(tmp_path) not in card  # the card names the data file, not where it lives
