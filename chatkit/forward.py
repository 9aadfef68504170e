"""The model's loss and log-probabilities at labelled positions: one path for training, validation,
the report and DPO.

Prompt tokens and padding carry no label, so their logits are never needed. The body runs alone and the
output layer (hidden size x vocabulary: 49k wide for the starter model, the largest single cost per
token) is applied only at labelled positions, a chunk at a time with its gradient
(`kernels.linear_cross_entropy`), never all kept at once. Models with soft-capped or scaled logits,
models without a separate body, and distributed runs (where the forward must go through the DDP
wrapper) take the model's full forward instead.

Imported only when a model runs: it imports torch at the top.
"""

from __future__ import annotations

import torch

from .errors import ChatkitError
from .formatting import IGNORE_INDEX
from .kernels import linear_cross_entropy
from .models import causal_lm_parts
from .costs import LOGITS_CHUNK, keeps_logits


def body_states(model, cache=None, **inputs):
    """(last hidden states, key/value cache) from the transformer body alone where the model has one, else from
    its full forward; `cache`: the keys and values of the tokens before `inputs`."""
    causal_lm, inner = causal_lm_parts(model)
    module = inner if inner is not None else causal_lm
    if cache is not None:
        inputs[cache_name(module)] = cache
    if inner is not None:
        output = inner(**inputs)
        return output.last_hidden_state, output_cache(output)
    output = causal_lm(output_hidden_states=True, **inputs)
    return output.hidden_states[-1], output_cache(output)


def cache_name(module) -> str:
    """The name a model's forward takes its key/value cache by: `cache` in newer transformers
    (`past_key_values` is deprecated there), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(output):
    """A forward's key/value cache, under its newer name or its older one."""
    return output["cache"] if "cache" in output else getattr(output, "past_key_values", None)


def labelled_features(model, inputs: dict, keep, fused: bool = True):
    """The hidden states at the positions `keep` marks (one before each labelled token) and the output
    layer, for the fused loss; or, where the output layer is not one plain matrix product (or `fused` is
    off), their float logits and None. `inputs` are the model's (no labels); padding on the right, so in a
    causal model no real token sees it and the body needs no attention mask."""
    causal_lm, inner = causal_lm_parts(model)
    head = causal_lm.get_output_embeddings()
    if fused and not keeps_logits(causal_lm.config) and inner is not None and head is not None:
        forward = {k: v for k, v in inputs.items() if k != "attention_mask"}
        hidden = inner(**forward).last_hidden_state[:, :-1][keep]
        if type(head) is torch.nn.Linear:  # not a quantized subclass: the fused loss reads its weight
            return hidden, head
        return head(hidden).float(), None
    return model(**inputs).logits[:, :-1][keep].float(), None


def cross_entropy_sum(features, head, targets):
    """The summed cross-entropy of the labelled positions: fused with the output layer when `head` is
    given (no vocabulary-wide logits kept), else of the logits `features`."""
    if head is None:
        return torch.nn.functional.cross_entropy(features, targets, reduction="sum")
    return linear_cross_entropy(features, head, targets, LOGITS_CHUNK)


def labelled_loss_sum(model, input_ids, labels):
    """(summed loss, labelled tokens) of a batch padded on the right, `labels` IGNORE_INDEX where none."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    features, head = labelled_features(model, {"input_ids": input_ids}, keep)
    return cross_entropy_sum(features, head, targets[keep]), keep.sum()


def labelled_token_losses(model, input_ids, labels):
    """(each labelled token's loss, the row it is in) for a batch padded on the right, the rows' labelled
    tokens in order: the output layer applied LOGITS_CHUNK positions at a time, at the labelled positions only."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    features, head = labelled_features(model, {"input_ids": input_ids}, keep)
    losses = torch.cat([torch.nn.functional.cross_entropy(head(part).float() if head is not None else part, goal,
                                                          reduction="none")
                        for part, goal in zip(features.split(LOGITS_CHUNK), targets[keep].split(LOGITS_CHUNK))])
    return losses, keep.nonzero()[:, 0]


def padded_batch(examples, device, pad: int = 0):
    """(input_ids, labels) of tokenized examples, padded on the right (labels with IGNORE_INDEX)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in examples]
    labels = [e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples]
    return torch.tensor(ids, device=device), torch.tensor(labels, device=device)


def finite(loss, where: str):
    """`loss`, or one error line where it is NaN or infinite: a step on it would make every weight
    non-finite, and a model saved after it answers with nothing."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ChatkitError(f"the loss became {float(loss.detach().float().reshape(-1)[0])} at {where}, so training "
                           "stopped before the weights took it and the model was not saved; lower "
                           "--learning-rate (or --dpo-learning-rate, --dpo-beta for preferences) and check that "
                           "the data's answers have text to learn")
    return loss
