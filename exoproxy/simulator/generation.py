"""
Simulated text generation: the bodies of `/api/generate`, `/api/chat` and
`/v1/chat/completions`, as paced steps.

The reply is a fixed sentence naming the model, cut into word tokens. Each token
takes one token interval. A streamed reply writes one line or event per token, and a
non-streamed reply waits for all tokens and then writes one JSON object, so both take
the same time.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Generator

from exoproxy.simulator.models import format_timestamp
from exoproxy.simulator.pacing import PacedStep

_NANOSECONDS = 1_000_000_000

# The simulated load time of a model, reported in `load_duration`.
_LOAD_DURATION_NS = 12_000_000


def reply_tokens(model: str, prompt: str, max_tokens: int | None) -> list[str]:
    """
    Cut the simulated reply to `prompt` into tokens, at most `max_tokens` of them.
    """
    word_count = len(prompt.split())
    text = f"This is a simulated reply from {model} to a prompt of {word_count} words."
    words = text.split(" ")
    tokens = [words[0]] + [f" {word}" for word in words[1:]]
    if max_tokens is not None and max_tokens >= 0:
        tokens = tokens[:max_tokens]
    return tokens


def _json_line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class Completion:
    """
    One simulated completion request.

    Attributes:
        model: The model name as the client sent it.
        prompt: The prompt text, or the last user message of a chat.
        tokens: The reply tokens.
        truncated: Whether `tokens` was cut by a token limit.
        started_at: The clock time of the request, in seconds.
        token_interval: The time per token, in seconds.
    """

    model: str
    prompt: str
    tokens: list[str]
    truncated: bool
    started_at: float
    token_interval: float

    def counters(self) -> dict[str, Any]:
        """
        Build the timing and token counters of Ollama's final object.
        """
        eval_duration = int(len(self.tokens) * self.token_interval * _NANOSECONDS)
        prompt_eval_duration = 1_000_000
        return {
            "done_reason": "length" if self.truncated else "stop",
            "total_duration": _LOAD_DURATION_NS + prompt_eval_duration + eval_duration,
            "load_duration": _LOAD_DURATION_NS,
            "prompt_eval_count": max(1, len(self.prompt.split())),
            "prompt_eval_duration": prompt_eval_duration,
            "eval_count": len(self.tokens),
            "eval_duration": eval_duration,
        }

    def created_at(self, token_index: int) -> str:
        return format_timestamp(self.started_at + token_index * self.token_interval)


def generate_steps(
    completion: Completion, stream: bool
) -> Generator[PacedStep, None, None]:
    """
    Produce the body of `/api/generate`: NDJSON lines, or one object.
    """
    for index, token in enumerate(completion.tokens):
        yield None
        if stream:
            yield _json_line(
                {
                    "model": completion.model,
                    "created_at": completion.created_at(index + 1),
                    "response": token,
                    "done": False,
                }
            )

    final = {
        "model": completion.model,
        "created_at": completion.created_at(len(completion.tokens)),
        "response": "" if stream else "".join(completion.tokens),
        "done": True,
        **completion.counters(),
        "context": list(range(1, len(completion.tokens) + 1)),
    }
    yield _json_line(final)


def chat_steps(
    completion: Completion, stream: bool
) -> Generator[PacedStep, None, None]:
    """
    Produce the body of `/api/chat`: NDJSON lines, or one object.
    """
    for index, token in enumerate(completion.tokens):
        yield None
        if stream:
            yield _json_line(
                {
                    "model": completion.model,
                    "created_at": completion.created_at(index + 1),
                    "message": {"role": "assistant", "content": token},
                    "done": False,
                }
            )

    content = "" if stream else "".join(completion.tokens)
    yield _json_line(
        {
            "model": completion.model,
            "created_at": completion.created_at(len(completion.tokens)),
            "message": {"role": "assistant", "content": content},
            "done": True,
            **completion.counters(),
        }
    )


def _sse_event(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def openai_chat_steps(
    completion: Completion, stream: bool, include_usage: bool
) -> Generator[PacedStep, None, None]:
    """
    Produce the body of `/v1/chat/completions`: server-sent events ending with
    `data: [DONE]`, or one `chat.completion` object.
    """
    completion_id = f"chatcmpl-{uuid.uuid4().int % 1000}"
    created = int(completion.started_at)
    finish_reason = "length" if completion.truncated else "stop"
    usage = {
        "prompt_tokens": max(1, len(completion.prompt.split())),
        "completion_tokens": len(completion.tokens),
        "total_tokens": max(1, len(completion.prompt.split())) + len(completion.tokens),
    }

    def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": completion.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        }

    for token in completion.tokens:
        yield None
        if stream:
            delta = {"role": "assistant", "content": token}
            yield _sse_event(json.dumps(chunk(delta, None)))

    if stream:
        final_chunk = chunk({"role": "assistant", "content": ""}, finish_reason)
        yield _sse_event(json.dumps(final_chunk))
        if include_usage:
            usage_chunk = chunk({}, None)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage
            yield _sse_event(json.dumps(usage_chunk))
        yield _sse_event("[DONE]")
        return

    message = {"role": "assistant", "content": "".join(completion.tokens)}
    reply = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": completion.model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage,
    }
    yield json.dumps(reply).encode()
