"""Two fused operations of the training step, each measured faster in bench/train_throughput.py.

- `linear_cross_entropy`: the output layer and its cross-entropy, a chunk of positions at a time. The
  gradient of the summed loss with respect to the hidden states (softmax minus one-hot, times the
  output matrix) is computed in the forward pass, so no vocabulary-wide logits outlive their chunk:
  the backward pass of an unfused cross-entropy zero-fills, then reads and writes, a tensor of
  positions x vocabulary several times.
- `fuse_lora`: LoRA's update added inside one matrix product (`addmm_` into the base layer's output,
  the scaling as its alpha), instead of three passes over the output (B's product, the scaling, the
  sum). It takes the plain case only (one adapter, no dropout, no merge, one dtype, no autocast) and
  leaves every other to peft.

Imported only when training starts: it imports torch at the top.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        ctx.weight_dtype = weight.dtype
        hidden_grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        weight_grad = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        bias_grad = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            part, wanted = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(part, weight, bias).float()
            normaliser = torch.logsumexp(logits, dim=-1)
            total += (normaliser - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
            if hidden_grad is None and weight_grad is None and bias_grad is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one-hot, computed in place of the logits.
            grad = logits.sub_(normaliser[:, None]).exp_()
            grad[torch.arange(len(wanted), device=grad.device), wanted] -= 1
            if hidden_grad is not None:
                hidden_grad[start:start + chunk] = grad.to(weight.dtype) @ weight
            if weight_grad is not None:
                weight_grad.addmm_(grad.t(), part.float())
            if bias_grad is not None:
                bias_grad += grad.sum(0)
        ctx.save_for_backward(hidden_grad, weight_grad, bias_grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        hidden_grad, weight_grad, bias_grad = ctx.saved_tensors

        def scaled(grad):  # the weight's and bias's were accumulated in float32
            return None if grad is None else (grad * grad_output).to(ctx.weight_dtype)

        hidden = None if hidden_grad is None else hidden_grad * grad_output
        return hidden, scaled(weight_grad), scaled(bias_grad), None, None


def linear_cross_entropy(hidden, head, targets, chunk: int):
    """The summed cross-entropy of `head(hidden)` against `targets`, without keeping the logits.

    `hidden` is (positions, width), `head` the output layer (an nn.Linear), `targets` the token ids;
    the logits of `chunk` positions exist at a time (the plan's LOGITS_CHUNK).
    The same value and gradients as `F.cross_entropy(head(hidden).float(), targets, reduction="sum")`.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward, with the update added inside one `addmm_` when the case is plain."""
    adapters = self.active_adapters
    plain = (not args and not kwargs and not self.disable_adapters and not self.merged and len(adapters) == 1
             and adapters[0] in self.lora_A and adapters[0] not in self.lora_variant
             and isinstance(self.lora_dropout[adapters[0]], torch.nn.Identity)
             and isinstance(self.base_layer, torch.nn.Linear)
             and not torch.is_autocast_enabled(x.device.type))
    if plain:
        name = adapters[0]
        down, up, base = self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer
        plain = x.dtype == base.weight.dtype == down.dtype == up.dtype
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    out = F.linear(flat, base.weight, base.bias)
    out = out.addmm_(F.linear(flat, down), up.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora(model) -> int:
    """Give every LoRA Linear layer of `model` the fused forward; returns how many layers took it."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count
