"""Preference mining: pairs of answers (chosen, rejected) and labelled answers from one conversation's tree,
by the user's own signs (thumbs, regenerations, the branch they went on from)."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

from . import export
from .policy import Stats, message_turn, normalise_turns


class Judged(NamedTuple):
    """One sibling answer and the user's signs about it."""

    node: str
    text: str
    rating: Optional[str]  # "up", "down" or None
    continued: bool  # the user went on from it


class PreferenceWalk:
    """Preference pairs from one conversation tree (the converter's other view of the same walk).

    - A regenerated answer: the user went on from one of the sibling answers (it is on the path to
      `current_node`, or a user turn follows it); that one is chosen, each sibling left without a
      follow-up is rejected.
    - Thumbs on sibling answers: a thumbed-up one is chosen, a thumbed-down one rejected (the full rule is
      `_pairs`'s).
    - A rated answer without a sibling: a labelled example (KTO's format: completion and label).
    Edits of the user's own message (sibling user turns) give nothing: they are not a judgement of an answer.
    """

    def __init__(self, converter, conversation: dict, ratings: Dict[str, str]):
        """`converter`: the conversion.Converter whose walk this is (its options, redactor, text cleaning)."""
        self.converter, self.conversation, self.ratings = converter, conversation, ratings
        self.mapping = conversation["mapping"]
        node, self.on_path = conversation.get("current_node"), set()
        while node in self.mapping and node not in self.on_path:
            self.on_path.add(node)
            node = export.node_parent(self.mapping, node)

    def records(self) -> Tuple[List[dict], List[dict]]:
        pairs, labelled = [], []
        for parent_id, node in self.mapping.items():
            answers = [(c, self._answer(c)) for c in self._children(parent_id)]
            answers = [(c, text) for c, text in answers if text]
            if not answers:
                continue
            # The prompt (a walk to the root) only where an answer was rated or regenerated: on every turn of
            # a long linear conversation it would cost time quadratic in its length.
            rating = self._rating(answers[0][0]) if len(answers) == 1 else None
            if len(answers) == 1 and not rating:
                continue
            prompt = self._prompt(parent_id)
            if prompt is None:
                continue
            if len(answers) == 1:
                labelled.append({"prompt": prompt, "completion": [_assistant(answers[0][1])], "label": rating == "up"})
                continue
            pairs += self._pairs(prompt, answers)
        return pairs, labelled

    def _pairs(self, prompt: List[dict], answers: List[Tuple[str, str]]) -> List[dict]:
        """The preference rule, for sibling answers to one prompt (stated once here; tests/test_preferences.py
        checks it for every combination of thumbs and branches):

        - Thumbs are the user's own judgement and outrank the branch they went on from.
        - Chosen: a thumbed-up answer; else one the user went on from that is not thumbed down; else, when an
          answer is thumbed down, one without thumbs. Otherwise there is no sign, and no pair.
        - Rejected: each thumbed-down answer ("thumbs"); and, when the user went on from an answer they did
          not thumb down, each answer they left without thumbs ("regeneration").
        - Never rejected: a thumbed-up answer, one the user went on from (unless thumbed down), or a copy of
          the chosen text. Never chosen: a thumbed-down answer.
        """
        judged = [Judged(node, text, self._rating(node), node in self.on_path or self._followed(node))
                  for node, text in answers]
        went_on = any(a.continued and a.rating != "down" for a in judged)
        thumbed_down = any(a.rating == "down" for a in judged)
        candidates = ([a for a in judged if a.rating == "up"]
                      + [a for a in judged if a.continued and a.rating != "down"]
                      + [a for a in judged if a.rating is None and thumbed_down])
        if not candidates:
            return []
        chosen, out = candidates[0], []
        for answer in judged:
            if answer.node == chosen.node or answer.text == chosen.text:
                continue
            if answer.rating == "down":
                source = "thumbs"
            elif answer.rating is None and not answer.continued and went_on:
                source = "regeneration"
            else:
                continue
            out.append({"prompt": prompt, "chosen": [_assistant(chosen.text)], "rejected": [_assistant(answer.text)],
                        "source": source})
        return out

    def _children(self, node_id: str) -> List[str]:
        children = (self.mapping.get(node_id) or {}).get("children") or []
        return list(dict.fromkeys(c for c in children if isinstance(c, str) and c in self.mapping))

    def _turn(self, node_id: str):
        try:
            return message_turn(self.mapping[node_id], self.converter.options, Stats())
        except export.SkipConversation:  # a message too long to learn from: that branch gives no pair
            return None

    def _answer(self, node_id: str) -> Optional[str]:
        turn = self._turn(node_id)
        return self._clean(turn[1]) if turn and turn[0] == "assistant" and turn[1].strip() else None

    def _followed(self, node_id: str) -> bool:
        """Whether a user turn comes after this answer (the user went on from it)."""
        stack, seen = list(self._children(node_id)), set()
        while stack:
            child = stack.pop()
            if child in seen:
                continue
            seen.add(child)
            turn = self._turn(child)
            if turn and turn[0] == "user":
                return True
            stack += self._children(child)
        return False

    def _rating(self, node_id: str) -> Optional[str]:
        message = self.mapping[node_id].get("message") or {}
        return self.ratings.get(message.get("id") if isinstance(message, dict) else None) or self.ratings.get(node_id)

    def _prompt(self, parent_id: str) -> Optional[List[dict]]:
        """The conversation up to and including the user turn the answers reply to (None if it ends otherwise)."""
        path, node = [], parent_id
        while node is not None and node not in path:
            path.append(node)
            node = export.node_parent(self.mapping, node)
        turns = [t for t in (self._turn(n) for n in reversed(path)) if t]
        if not turns or turns[-1][0] != "user":
            return None
        messages = normalise_turns(turns + [("assistant", "-", False)])[:-1]
        if not messages or messages[-1]["role"] != "user":
            return None
        for message in messages:
            message["content"] = self._clean(message["content"])
        system = self.converter.system_for(self.conversation)
        return ([{"role": "system", "content": system}] if system else []) + messages

    def _clean(self, text: str) -> str:
        converter = self.converter
        text = converter.redactor(text) if converter.redactor else text
        return converter.clean(text)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
