"""A chat completions request as the API server takes it: the body checked field by field (OpenAI's names
and limits, unsupported fields refused by name), the errors as OpenAI's error objects, and stop strings
found in a stream of pieces."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

MAX_STOPS = 4  # as OpenAI's API allows
MAX_STOP_CHARS = 1000  # a stop string is a few characters; a long one would be rescanned with every piece
# OpenAI's fields this server does not serve: refused with a 400 naming them, not silently ignored.
UNSUPPORTED = {"logprobs": "token log-probabilities", "top_logprobs": "token log-probabilities",
               "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
               "function_call": "function calls", "response_format": "structured output (JSON mode, schemas)",
               "logit_bias": "logit bias", "audio": "audio output", "prediction": "predicted outputs"}
ACCEPTED_DEFAULTS = {"tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
                     "response_format": ({"type": "text"},)}
ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A request the API refuses: an HTTP status, a message and the parameter at fault."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, low: float, high: float, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number from {low:g} to {high:g}, not {value!r}", name)
    return value


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (other parts are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}: only text content is supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where} must be a string or a list of text parts", where)


@dataclasses.dataclass
class ChatRequest:
    """A checked /v1/chat/completions body."""

    system: Optional[str]
    history: List[dict]
    prompt: str
    temperature: Optional[float]
    top_p: Optional[float]
    max_tokens: Optional[int]
    stop: List[str]
    stream: bool
    include_usage: bool
    seed: Optional[int]

    @classmethod
    def parse(cls, body) -> "ChatRequest":
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
        system, history = None, []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise RequestError(f"{where} needs a 'role' of {', '.join(ROLES)}", where)
            text = _text(message.get("content"), f"{where}.content")
            if message["role"] in ("system", "developer"):
                system = text if system is None else system + "\n\n" + text
            else:
                history.append({"role": message["role"], "content": text})
        if not history or history[-1]["role"] != "user":
            raise RequestError("the last message must be the user's (the model answers it)", "messages")
        if body.get("n") not in (None, 1):
            raise RequestError("'n' must be 1: one answer per request", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise RequestError(f"'max_tokens' must be a positive whole number, not {max_tokens!r}", "max_tokens")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOPS} strings", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise RequestError(f"each 'stop' string must be at most {MAX_STOP_CHARS:,} characters", "stop")
        for name, what in UNSUPPORTED.items():
            if body.get(name) not in (None, False, [], {}) and body.get(name) not in ACCEPTED_DEFAULTS.get(name, ()):
                raise RequestError(f"'{name}' is not supported by this server ({what}); leave it out", name)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", "stream")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError("'seed' must be a whole number", "seed")
        seed = None if seed is None else seed % 2**32  # any size a client sends; torch takes 64 bits at most
        options = body.get("stream_options") or {}
        return cls(system=system, history=history[:-1], prompt=history[-1]["content"],
                   temperature=_number(body, "temperature", 0, 2, None), top_p=_number(body, "top_p", 0, 1, None),
                   max_tokens=max_tokens, stop=stop, stream=stream,
                   include_usage=bool(isinstance(options, dict) and options.get("include_usage")), seed=seed)


class StopScanner:
    """Cuts streamed text at the first stop string, holding back what could be the start of one."""

    def __init__(self, stops: List[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        """The text that is safe to send now."""
        self.pending += piece
        found = [self.pending.find(s) for s in self.stops if s in self.pending]
        if found:
            self.stopped = True
            text, self.pending = self.pending[:min(found)].rstrip(), ""
            return text
        # only as much of a stop string as there is text to hold back: a long stop string costs little
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        text = self.pending[:len(self.pending) - keep]
        text = text.rstrip()  # trailing spaces wait: the answer's own end has none
        self.pending = self.pending[len(text):]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
