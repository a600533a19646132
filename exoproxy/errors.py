"""
Error responses in Ollama's own shape: a JSON object whose first field is "error".
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request


def error_body(message: str, **extra: Any) -> bytes:
    """
    Return the JSON body of an error. The official clients show the "error" field,
    so it comes first.
    """
    return json.dumps({"error": message, **extra}).encode("utf-8")


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
    body = error_body(message, **extra)
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.write(body)
    request.finish()
