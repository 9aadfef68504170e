"""Rehearsal: the model's own answers to general prompts, trained alongside a small data set.

Fine-tuning on a narrow data set teaches its answer pattern everywhere. After sixty answers of the
form "The <role> of the institute is <name>.", the starter model answers "What is the capital of
France?" with "The capital of France is capital city." A few examples of what the model itself
answers to unrelated prompts, trained alongside the user's data, show it where the new pattern does
not apply; because they are its own answers, they pull it back towards what it already did rather
than teaching anything new. docs/PERFORMANCE.md has the measurements.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

from .formatting import pad_token_id, render, stop_token_ids, with_system_prompt

# Varied everyday requests: facts, arithmetic, language, how-to, short writing. A run takes those most
# like the user's prompts (closest_prompts); without user prompts, the first ones, so the order mixes
# the kinds.
GENERAL_PROMPTS = [
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Translate \"thank you\" into Spanish.",
    "What is the chemical symbol for gold?",
    "Give me a synonym for happy.",
    "What do you call a baby dog?",
    "Which ocean is the largest?",
    "Write one sentence about autumn.",
    "What is the boiling point of water at sea level?",
    "Who painted the Mona Lisa?",
    "What is the plural of mouse?",
    "Give me a tip for sleeping better.",
    "What gas do plants take in from the air?",
    "How many sides does a hexagon have?",
    "What is the opposite of ancient?",
    "Who was the first person to walk on the Moon?",
    "What is the square root of 81?",
    "What language is spoken in Brazil?",
    "Suggest a name for a pet goldfish.",
    "What does a thermometer measure?",
    "What is the main ingredient of guacamole?",
    "What is the past tense of run?",
    "Which organ pumps blood through the body?",
    "How do I make a cup of tea?",
    "What is 15 plus 27?",
    "What currency is used in Japan?",
    "What do caterpillars turn into?",
    "Explain what a noun is.",
    "Which instrument has 88 keys?",
    "What is the hardest natural substance?",
    "Write a haiku about the sea.",
    "How many strings does a standard guitar have?",
    "What is the largest mammal?",
    "What is a prime number?",
    "Who invented the telephone?",
    "Give me a word that rhymes with cat.",
    "What is the longest river in Africa?",
    "Which metal is liquid at room temperature?",
    "What does DNA stand for?",
    "Recommend a good habit for staying healthy.",
    "What is 100 divided by 4?",
    "What is the main gas in Earth's atmosphere?",
    "Describe a forest in one sentence.",
    "What do you call frozen water?",
    "Who discovered penicillin?",
    "How many players are on a soccer team?",
    "What is gravity?",
    "Which bird is a symbol of peace?",
    "What is the chemical symbol for iron?",
    "How do you say hello in French?",
    "What animal is known as the king of the jungle?",
    "What is the smallest prime number?",
    "What is the Pythagorean theorem?",
    "What is the currency of the United Kingdom?",
    "Name a fruit that is yellow.",
    "What is the opposite of hot?",
    "What is photosynthesis?",
    "How many minutes are in an hour?",
    "What is the freezing point of water in Fahrenheit?",
    "What is the tallest animal?",
    "What is H2O?",
    "How many continents are there?",
    "What does a bakery sell?",
    "Give me an example of a verb.",
]

AUTO_PER, AUTO_MAX = 8, 32  # one rehearsal example per 8 conversations, at most 32
# Answers are cut after this many tokens: the start of an answer is where its shape is set. A cut
# answer teaches no cutting, since each position is trained towards what the model itself predicted
# there, and after the cut that is to go on.
ANSWER_TOKENS = 64
GENERATION_BATCH = 16
STATE_BATCH = 8  # prompts per forward pass when ranking: real prompts vary in length; 32 padded them to 2x the time and memory


def auto_count(conversations: int) -> int:
    """Rehearsal examples for a data set: one per eight conversations (rounded up), at most 32."""
    return min(AUTO_MAX, math.ceil(conversations / AUTO_PER))


@dataclass
class Rehearsal:
    conversations: List[List[dict]] = field(default_factory=list)
    asked: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        return (f"rehearsal: {len(self.conversations)} of the model's own answers to general prompts "
                f"({self.asked} asked, {self.seconds:.1f} s) train alongside the data, to keep its general "
                "answers (--rehearsal 0 turns this off)")


@contextlib.contextmanager
def _evaluating(model):
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _prompt_ids(tokenizer, prompts: List[str], system_prompt: Optional[str]) -> List[List[int]]:
    """Each prompt as a one-turn conversation rendered up to the start of the answer, as token ids."""
    return [tokenizer(render(with_system_prompt([{"role": "user", "content": p}], system_prompt), tokenizer,
                             add_generation_prompt=True), add_special_tokens=False)["input_ids"] for p in prompts]


def own_answers(model, tokenizer, prompts: List[str], system_prompt: Optional[str] = None,
                max_new_tokens: int = ANSWER_TOKENS, adapters: Optional[List[str]] = None,
                batch: int = GENERATION_BATCH) -> List[str]:
    """The model's greedy answer to each prompt, batched, cut after max_new_tokens.

    `adapters` names, per prompt, the LoRA adapter that answers it ("__base__": none), so a base and a
    trained answer to the same prompt can share one batch."""
    import torch

    stops = stop_token_ids(tokenizer)
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    answers: List[str] = []
    with _evaluating(model):
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            extra = {"adapter_names": adapters[start : start + batch]} if adapters else {}
            encoded = _prompt_ids(tokenizer, chunk, system_prompt)
            width = max(len(ids) for ids in encoded)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
            with torch.no_grad():
                output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, temperature=None, top_p=None, top_k=None,
                                        eos_token_id=stops, pad_token_id=pad, use_cache=True, **extra)
            for row in output[:, width:].tolist():
                end = next((i for i, token in enumerate(row) if token in stops), None)
                answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def answer_states(model, tokenizer, prompts: List[str], system_prompt: Optional[str] = None):
    """The model's last hidden state at the point where it starts to answer each prompt: [prompts, hidden].

    The rendered prompts share their start (the system prompt and the template's opening), which is
    run once per batch and reused from the cache. Each batch is padded on the right: in a causal
    model no real token sees the padding, so no attention mask is needed.
    """
    import torch

    from .forward import body_states as run

    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    encoded = _prompt_ids(tokenizer, prompts, system_prompt)
    shared = 0  # tokens every prompt starts with, leaving each at least one of its own
    while shared < min(len(ids) for ids in encoded) - 1 and len({ids[shared] for ids in encoded}) == 1:
        shared += 1
    states = []
    with _evaluating(model), torch.no_grad():
        for start in range(0, len(encoded), STATE_BATCH):
            rest = [ids[shared:] for ids in encoded[start : start + STATE_BATCH]]
            width = max(len(ids) for ids in rest)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rest], device=device)
            cache = None
            if shared:
                _, cache = run(model, input_ids=torch.tensor([encoded[0][:shared]], device=device), use_cache=True)
                cache.batch_repeat_interleave(len(rest))
            positions = torch.arange(shared, shared + width, device=device).expand(len(rest), -1)
            hidden, _ = run(model, cache, input_ids=input_ids, position_ids=positions, use_cache=cache is not None)
            ends = torch.tensor([len(ids) - 1 for ids in rest], device=device)
            states.append(hidden[torch.arange(len(rest), device=device), ends].float())
    return torch.cat(states)


SAMPLED_PROMPTS = 64  # user prompts compared with the general ones, at most
PROMPT_CHARS = 1000  # of each, enough to tell what kind of request it is


def closest_prompts(model, tokenizer, user_prompts: List[str], system_prompt: Optional[str] = None,
                    seed: int = 0) -> List[str]:
    """GENERAL_PROMPTS, those on which the model starts its answer most as it does on the user's first.

    A narrow data set drifts the model most on prompts like its own: after sixty "Who is the <role>
    of the institute?" questions, "Who wrote Romeo and Juliet?" takes the taught shape long before
    "Write a haiku about the sea." does. Prompts are compared by the model's hidden state at the
    first answer token (cosine similarity to the mean over the user's prompts, both measured from
    the general prompts' mean).
    """
    import random

    import torch

    if not user_prompts:
        return list(GENERAL_PROMPTS)
    if len(user_prompts) > SAMPLED_PROMPTS:
        user_prompts = random.Random(seed).sample(list(user_prompts), SAMPLED_PROMPTS)
    general = answer_states(model, tokenizer, GENERAL_PROMPTS, system_prompt)
    user = answer_states(model, tokenizer, [p[:PROMPT_CHARS] for p in user_prompts], system_prompt)
    centre = general.mean(0)
    general = torch.nn.functional.normalize(general - centre, dim=-1)
    target = torch.nn.functional.normalize((user - centre).mean(0), dim=-1)
    order = (general @ target).argsort(descending=True).tolist()
    return [GENERAL_PROMPTS[i] for i in order]


def rehearsal_conversations(model, tokenizer, count: int, system_prompt: Optional[str] = None,
                            like: Optional[List[str]] = None) -> Rehearsal:
    """Up to `count` conversations of a general prompt and the start of the model's own answer to it.

    With `like` (the user's prompts), the general prompts closest to them are taken.
    """
    result = Rehearsal()
    if count <= 0:
        return result
    started = time.perf_counter()
    prompts = closest_prompts(model, tokenizer, like or [], system_prompt)[:count]
    for prompt, answer in zip(prompts, own_answers(model, tokenizer, prompts, system_prompt)):
        if answer:
            result.conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    result.asked = len(prompts)
    result.seconds = time.perf_counter() - started
    return result


TEACHER_TOP_K = 32  # the model's most likely next tokens kept per answer position
# Weight of a rehearsal position against a position of the user's data. Measured (docs/PERFORMANCE.md):
# 2 and 4 keep more general answers but cost half the facts; 0.5 and 1 keep most facts.
TEACHER_WEIGHT = 0.5


@dataclass
class Teacher:
    """The model's own next-token distribution (top k) at each answer token of the rehearsal examples.

    Rehearsal examples are trained towards these distributions rather than towards the sampled
    answer text: at the start of training the loss on them is zero, so they do not compete with the
    user's data; they only pull back once the model drifts from what it did before.
    """

    ids: "object"  # LongTensor [positions, k]
    logprobs: "object"  # FloatTensor [positions, k]

    def joined(self, other: "Teacher") -> "Teacher":
        """This table with `other`'s rows after its own (attach `other` with `start` = this table's rows)."""
        import torch

        return Teacher(torch.cat([self.ids, other.ids]), torch.cat([self.logprobs, other.logprobs]))


def attach_teacher(model, examples: List[dict], top_k: int = TEACHER_TOP_K, start: int = 0) -> Teacher:
    """Record the model's top-k next-token log-probabilities at every trained position of `examples`.

    Each example gets `teacher_index`: per token, the row of the returned table (counted from `start`,
    where it goes after another table's rows) that holds the model's distribution for predicting it, or -1.
    """
    import torch

    from .formatting import IGNORE_INDEX

    device = next(model.parameters()).device
    ids_rows, logprob_rows, total = [], [], start
    with _evaluating(model):
        for example in examples:
            input_ids = torch.tensor([example["input_ids"]], device=device)
            with torch.no_grad():
                logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
            positions = [p for p, label in enumerate(example["labels"]) if p > 0 and label != IGNORE_INDEX]
            logprobs = torch.log_softmax(logits[[p - 1 for p in positions]], dim=-1)
            top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
            ids_rows.append(top.indices.cpu())
            logprob_rows.append(top.values.cpu())
            index = [-1] * len(example["input_ids"])
            for offset, position in enumerate(positions):
                index[position] = total + offset
            total += len(positions)
            example["teacher_index"] = index
    return Teacher(torch.cat(ids_rows), torch.cat(logprob_rows))


def teacher_loss(logits, teacher: Teacher, rows):
    """Summed KL divergence from the teacher's distribution to the model's over positions `rows`, weighted.

    The vocabulary is reduced to the teacher's top k tokens plus one bucket for all others, so the
    divergence stays exact (zero only when the two agree on that partition) without the full teacher
    distribution in memory.
    """
    import torch

    if teacher.ids.device != logits.device:
        teacher.ids, teacher.logprobs = teacher.ids.to(logits.device), teacher.logprobs.to(logits.device)
    ids, target = teacher.ids[rows], teacher.logprobs[rows]
    logq = torch.log_softmax(logits, dim=-1).gather(1, ids)
    p_rest = (1 - target.exp().sum(-1)).clamp_min(1e-12)
    q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
    kl = (target.exp() * (target - logq)).sum() + (p_rest * (p_rest.log() - q_rest.log())).sum()
    return TEACHER_WEIGHT * kl
