"""
Error responses in the shape of the API that the client called: Ollama's own
`{"error": "..."}`, or on the OpenAI-compatible `/v1/` routes
`{"error": {"message": "...", "type": "..."}}`, as Ollama's compatibility layer
writes them. Either way "error" is the first field, which the official clients read.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request

# The error types that Ollama's OpenAI compatibility layer (openai/openai.go) gives
# each status; every other status is an "api_error".
_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def error_body(message: str, **extra: Any) -> bytes:
    """
    Return the JSON body of an Ollama error.
    """
    return json.dumps({"error": message, **extra}).encode("utf-8")


def openai_error_body(code: int, message: str, **extra: Any) -> bytes:
    """
    Return the JSON body of an error on an OpenAI-compatible route.
    """
    error = {
        "message": message,
        "type": _OPENAI_ERROR_TYPES.get(code, "api_error"),
        "param": None,
        "code": None,
    }
    return json.dumps({"error": error, **extra}).encode("utf-8")


def send_error(
    request: Request,
    code: int,
    message: str,
    *,
    headers: dict[bytes, bytes] | None = None,
    **extra: Any,
) -> None:
    """
    Answer C{request} with an error and finish it.

    Does nothing when the request has already finished or its client is gone, so a
    caller may use it on any path of a failure.
    """
    if request.finished or request._disconnected:
        return
    if request.path.startswith(b"/v1/"):
        body = openai_error_body(code, message, **extra)
    else:
        body = error_body(message, **extra)
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.write(body)
    request.finish()
