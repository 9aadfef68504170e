"""What a model's training costs on a machine: work and memory per token (`Shape`, from its config), and the
seconds of each part of a run (training, evaluation, rehearsal, the report, DPO) at the machine's rate.

Work per token: 4 x the transformer's parameters for LoRA (6 x for full fine-tuning), attention (12 x
layers x width x sequence length), and the output layer at the trained positions only. Memory: the
weights, plus per token in the largest batch the activations kept for the backward pass, plus one chunk
of the output layer's logits (all of them for a model that keeps them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from .machine import Machine

# Python, torch, transformers, the tokenized data and what the C heap keeps between steps of varying
# shapes: 0.75 GiB before any weights, and about as much again in the real runs of docs/PERFORMANCE.md.
PROCESS_BYTES = 1.5 * 2**30
STEP_OVERHEAD_S = 0.02  # optimizer step and bookkeeping
# ... and what a step costs whatever its size (each layer's kernels started, the adapters' update), as the
# work of this many tokens: bench/train_memory.py on the starter, 3 x 64 tokens 1.50 s a step against
# 3 x 200 tokens 3.96 s, is 6.0 ms a token and 0.35 s a step (docs/PERFORMANCE.md)
STEP_OVERHEAD_TOKENS = 48
REHEARSAL_S = (2.0, 0.6)  # fixed, then per answer generated (64 tokens, batches of 16)
REPORT_S = 0.21  # per report answer (32 tokens; base and trained answers share batches)
# The fused loss (chatkit/kernels.py) holds the logits of LOGITS_CHUNK positions at a time: LOGITS_BYTES
# per position and vocabulary entry (float32 logits turned into their gradient in place, and a copy).
LOGITS_CHUNK = 1024
LOGITS_BYTES = 8
# bitsandbytes' storage per parameter: nf4 with double quantization (4 bits, an 8-bit scale per 64 and a
# float32 one per 256 blocks), and int8 (with one float32 scale per row, negligible).
QUANTIZED_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.0}
# A quantized CPU step against the float32 one, measured with bench/train_memory.py (docs/PERFORMANCE.md).
QUANTIZED_SLOWDOWN = {4: 1.2, 8: 1.2}
# Recomputing the activations in the backward pass: one more forward through the layers, about 1.1x to
# 1.2x a LoRA step on the CPU (bench/train_memory.py, docs/PERFORMANCE.md).
CHECKPOINTING_SLOWDOWN = 1.2


def keeps_logits(config) -> bool:
    """Whether a model's logits are soft-capped or scaled: its own forward then computes them all, and the
    output layer is not one plain matrix product the fused loss can take."""
    return any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))


@dataclass
class Shape:
    """What the estimates need to know of a model, from its config."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    logits_kept: bool = False  # soft-capped or scaled logits: the model's own forward, all logits kept
    weight_bits: int = 32  # the frozen transformer layers' storage: 32, or 8 and 4 through bitsandbytes

    @classmethod
    def from_config(cls, config, weight_bits: int = 32) -> "Shape":
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768)
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12)
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        vocab = getattr(config, "vocab_size", 32000)
        # Attention (queries and output h x h; keys and values narrower with grouped heads), a gated or
        # plain MLP, and the embeddings.
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
        kv_share = (getattr(config, "num_key_value_heads", None) or heads) / heads
        mlp = 3 if getattr(config, "hidden_act", "") in ("silu", "swish") else 2
        params = layers * ((2 + 2 * kv_share) * hidden * hidden + mlp * hidden * intermediate) + vocab * hidden
        return cls(params, layers, hidden, intermediate, vocab, keeps_logits(config), weight_bits)

    @property
    def slowdown(self) -> float:
        """How much longer a step takes than in full precision: quantized layers are unpacked as they run."""
        return QUANTIZED_SLOWDOWN.get(self.weight_bits, 1.0)

    @property
    def body_params(self) -> int:
        """The transformer layers' parameters: all but the embeddings."""
        return self.params - self.vocab * self.hidden

    def weight_bytes(self) -> float:
        """The weights' memory: the layers at their storage size, the embeddings in float32."""
        return self.body_params * QUANTIZED_BYTES.get(self.weight_bits, 4.0) + self.vocab * self.hidden * 4

    def flops_per_token(self, sequence: float, trained_share: float, lora: bool) -> float:
        # the embedding lookup costs nothing
        return ((4 if lora else 6) * self.body_params + 12 * self.layers * self.hidden * sequence
                + 6 * self.hidden * self.vocab * trained_share)

    def step_bytes(self, tokens: int, checkpointing: bool, trained_share: float) -> float:
        """Memory one step of `tokens` padded tokens needs on top of the weights."""
        kept = 2 if checkpointing else 6  # activations per layer and width, kept for the backward pass
        activations = tokens * kept * self.layers * (self.hidden + self.intermediate) * 4
        trained = tokens * trained_share
        if self.logits_kept:  # logits, their softmax and its gradient, at every trained position
            return activations + 6 * self.vocab * 4 * trained
        return activations + LOGITS_BYTES * self.vocab * min(trained, LOGITS_CHUNK)  # one chunk at a time

    def fixed_bytes(self, lora: bool) -> float:
        if not lora:  # full fine-tuning: float32 weights, their gradients and Adam's two moments
            return PROCESS_BYTES + self.params * 4 * 4
        return PROCESS_BYTES + self.weight_bytes()


def batch_widths(lengths: Sequence[int], batches: List[List[int]]) -> List[int]:
    """Padded tokens of each batch (rows x its longest example)."""
    return [len(batch) * max(lengths[i] for i in batch) for batch in batches]


def training_seconds(widths: Sequence[int], rows: Sequence[int], shape: Shape, machine: Machine,
                     trained_share: float, lora: bool) -> float:
    """Seconds for one pass over batches of the given padded widths (tokens) and row counts."""
    return sum((width + STEP_OVERHEAD_TOKENS) * shape.flops_per_token(width / count, trained_share, lora)
               * shape.slowdown / machine.rate + STEP_OVERHEAD_S for width, count in zip(widths, rows))


def evaluation_seconds(val_tokens: int, shape: Shape, machine: Machine, evaluations: int) -> float:
    forward = shape.flops_per_token(512, 1.0, True) / 2 * shape.slowdown  # forward only
    return evaluations * val_tokens * forward / machine.rate


def reading_seconds(tokens: int, shape: Shape, machine: Machine) -> float:
    """Reading `tokens` with the model, forward only, in batches of short exchanges."""
    return tokens * shape.flops_per_token(256, 0.5, True) / 2 * shape.slowdown / machine.rate


def rehearsal_seconds(count: int, ranking_tokens: int = 0, shape: Optional[Shape] = None,
                      machine: Optional[Machine] = None) -> float:
    """Generating `count` answers, after ranking the general prompts (a forward pass over `ranking_tokens`)."""
    if not count:
        return 0.0
    ranking = 0.0
    if shape is not None and machine is not None:
        ranking = ranking_tokens * shape.flops_per_token(128, 0.0, True) / 2 / machine.rate
    return REHEARSAL_S[0] + REHEARSAL_S[1] * count + ranking


def report_seconds(answers: int, loss_tokens: int, shape: Shape, machine: Machine, prompt_tokens: int = 0) -> float:
    """The report: `answers` short greedy answers to prompts of `prompt_tokens` tokens in all, and the loss
    on `loss_tokens` tokens for both models."""
    forward = shape.flops_per_token(512, 1.0, True) / 2 / machine.rate
    return REPORT_S * answers + (2 * loss_tokens + prompt_tokens) * forward


def preference_seconds(pair_tokens: Sequence[int], epochs: int, shape: Shape, machine: Machine) -> float:
    """DPO: each pair's two conversations trained once an epoch, one pair a step, and the forward passes of
    the reference and of the margins measured before and after (about 1.5 passes over the pairs)."""
    if not pair_tokens:
        return 0.0
    tokens = sum(pair_tokens)
    per_token = shape.flops_per_token(tokens / len(pair_tokens) / 2, 1.0, True)
    forward_share = 0.5  # a forward pass costs about half a training step's forward and backward
    return ((epochs + 1.5 * forward_share) * tokens * per_token / machine.rate
            + epochs * len(pair_tokens) * 2 * STEP_OVERHEAD_S)
