"""One forward path at labelled positions (chatkit/forward.py): the report's loss, DPO's log-probabilities
and the training loss agree with the full logits, and the output layer runs at labelled positions only."""

from __future__ import annotations

import pytest
import torch

from chatkit import forward
from chatkit.dpo import sequence_logps
from chatkit.formatting import IGNORE_INDEX
from chatkit.report import mean_loss


def load(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def examples(count=3):
    torch.manual_seed(1)
    made = []
    for i in range(count):
        ids = torch.randint(5, 200, (12 + 5 * i,)).tolist()
        labels = [IGNORE_INDEX] * (6 + i) + ids[6 + i:]  # a prompt, then the answer
        made.append({"input_ids": ids, "labels": labels})
    return made


def full_logps(model, example):
    """The answer's summed log-probability from the model's own vocabulary-wide logits."""
    ids = torch.tensor([example["input_ids"]])
    targets = torch.tensor([example["labels"][1:]])
    logits = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    keep = targets != IGNORE_INDEX
    return logits.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)[keep].sum()


def head_calls(model):
    calls = []
    head = model.get_base_model().get_output_embeddings()
    return calls, head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[:-1]))


def test_dpo_log_probabilities_go_through_the_fused_output_layer(tiny_llama):
    model = load(tiny_llama)
    example = examples(1)[0]
    calls, hook = head_calls(model)
    ours = sequence_logps(model, example["input_ids"], example["labels"])
    hook.remove()
    assert calls == []  # the fused loss reads the head's weight: no logits at the prompt's positions
    theirs = full_logps(model, example)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5) and float(ours) < 0
    ours.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    theirs.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(fused[name], parameter.grad, rtol=1e-4, atol=1e-6)


def test_the_report_dpo_and_the_batch_loss_are_one_computation(tiny_llama):
    model = load(tiny_llama)
    made = examples(3)
    with torch.no_grad():
        total, count = forward.labelled_loss_sum(model, *forward.padded_batch(made, "cpu"))
        one_by_one = [float(sequence_logps(model, e["input_ids"], e["labels"])) for e in made]
        expected = -sum(float(full_logps(model, e)) for e in made)
    labelled = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in made)
    assert int(count) == labelled
    assert float(total) == pytest.approx(expected, rel=1e-5)  # padding on the right changes nothing
    assert -sum(one_by_one) == pytest.approx(expected, rel=1e-5)
    assert mean_loss(model, made) == pytest.approx(expected / labelled, abs=1e-4)


def test_a_model_that_keeps_its_logits_takes_its_own_forward(tiny_llama):
    model = load(tiny_llama)
    example = examples(1)[0]
    model.get_base_model().config.final_logit_softcapping = 30.0  # as Gemma 2's: the head is not one product
    calls, hook = head_calls(model)
    with torch.no_grad():
        ours = sequence_logps(model, example["input_ids"], example["labels"])
    hook.remove()
    assert calls == [torch.Size([1, len(example["input_ids"])])]  # the model's own forward, every position
    with torch.no_grad():
        assert float(ours) == pytest.approx(float(full_logps(model, example)), rel=1e-5)


def test_a_loss_that_becomes_nan_stops_the_run_with_one_line_and_saves_no_model(tmp_path, tiny_llama, capsys,
                                                                                 monkeypatch):
    import json

    import train_chatgpt_model as cli
    from chatkit import engine

    real, calls = engine.cross_entropy_sum, []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(engine, "cross_entropy_sum", poisoned)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": f"Question {i}?"},
                                              {"role": "assistant", "content": f"Answer number {i}."}]}
                                for i in range(8)]))
    code = cli.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(tmp_path / "out"),
                     "--rehearsal", "0", "--batch-size", "1", "--epochs", "1", "--val-split", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: the loss became nan at step 3, so training stopped")
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p.name != "data.json")
    assert not [name for name in left if name.endswith(".safetensors") or name.endswith("chatkit.json")], left


def test_a_non_finite_loss_is_named_where_it_happened():
    from chatkit.errors import ChatkitError

    assert float(forward.finite(torch.tensor(2.5), "step 1")) == 2.5
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ChatkitError, match=f"the loss became {bad} at preference step 4"):
            forward.finite(torch.tensor(bad), "preference step 4")
