"""The fused operations of the training step give the unfused results: the same loss, the same gradients."""

from __future__ import annotations

import pytest
import torch


def unfused_loss(hidden, head, targets):
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_has_the_unfused_loss_and_gradients_chunk_by_chunk(bias):
    from chatkit.kernels import linear_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    expected = unfused_loss(hidden, head, targets)
    expected_grads = torch.autograd.grad(expected * 0.5, [hidden, *head.parameters()])
    got = linear_cross_entropy(hidden, head, targets, chunk=4)  # three chunks, the last one short
    got_grads = torch.autograd.grad(got * 0.5, [hidden, *head.parameters()])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for mine, theirs in zip(got_grads, expected_grads):
        assert torch.allclose(mine, theirs, atol=1e-6), (mine - theirs).abs().max()


def test_linear_cross_entropy_with_a_frozen_head_and_without_gradients():
    from chatkit.kernels import linear_cross_entropy

    torch.manual_seed(1)
    head = torch.nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 30, (5,))
    loss = linear_cross_entropy(hidden, head, targets, chunk=2)
    loss.backward()
    hidden_grad = hidden.grad.clone()
    hidden.grad = None
    unfused_loss(hidden, head, targets).backward()
    assert torch.allclose(hidden_grad, hidden.grad, atol=1e-6) and head.weight.grad is None
    with torch.no_grad():  # validation: the loss alone
        assert linear_cross_entropy(hidden, head, targets, 3).item() == pytest.approx(loss.item(), rel=1e-6)
    assert linear_cross_entropy(hidden[:0], head, targets[:0], 3).item() == 0.0


def lora_model(path, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # the same adapter each time
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # a trained adapter: B is no longer zero
    return model


def loss_and_grads(model, ids):
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    grads = torch.autograd.grad(loss, [parameter for parameter in model.parameters() if parameter.requires_grad])
    return logits.detach(), dict(zip(names, grads))


def test_fused_lora_gives_peft_s_outputs_and_gradients(tiny_llama):
    from chatkit.kernels import fuse_lora

    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    peft_logits, peft_grads = loss_and_grads(lora_model(tiny_llama), ids)
    fused = lora_model(tiny_llama)
    assert fuse_lora(fused) == 2 * 4  # two layers, four adapted matrices each
    fused_logits, fused_grads = loss_and_grads(fused, ids)
    assert torch.allclose(fused_logits, peft_logits, atol=1e-5)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) == 16
    for name, grad in fused_grads.items():
        assert grad.abs().sum() > 0 and torch.allclose(grad, peft_grads[name], atol=1e-5), name


def test_fused_lora_leaves_the_adapter_off_and_merged_cases_to_peft(tiny_llama):
    from transformers import AutoModelForCausalLM

    from chatkit.kernels import fuse_lora

    ids = torch.tensor([[5, 17, 42, 8]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="float32")
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        model = lora_model(tiny_llama)
        trained_logits = model(input_ids=ids).logits
        fuse_lora(model)
        with model.disable_adapter():
            assert torch.allclose(model(input_ids=ids).logits, base_logits, atol=1e-5)
        assert not torch.allclose(trained_logits, base_logits, atol=1e-3)
        merged = model.merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, trained_logits, atol=1e-4)
