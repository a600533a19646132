"""
Request parsing and response writing shared by the routes of the simulated Ollama.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.web.server import Request

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
EVENT_STREAM = b"text/event-stream"
TEXT = b"text/plain; charset=utf-8"

# Ollama unloads an idle model after 5 minutes unless `keep_alive` sets otherwise.
_DEFAULT_KEEP_ALIVE = 300.0
_KEEP_ALIVE_FOREVER = 100 * 365 * 24 * 3600.0
_DURATION = re.compile(r"^(?P<number>-?\d+(\.\d+)?)(?P<unit>ms|s|m|h)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class OllamaError(Exception):
    """
    A request that fails with `status` and the native `{"error": message}` body.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def respond(request: Request, status: int, content_type: bytes, body: bytes) -> bytes:
    """
    Set the status and content type, and return the body to render.

    A HEAD request gets the Content-Length of `body` and an empty body.
    """
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    if request.method == b"HEAD":
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""
    return body


def respond_json(request: Request, status: int, payload: Any) -> bytes:
    """
    Set the status and return `payload` as the JSON body to render.
    """
    return respond(request, status, JSON, json.dumps(payload).encode())


def read_json(request: Request) -> dict[str, Any]:
    """
    Parse the request body as a JSON object.

    Raises:
        OllamaError: The body is empty, invalid JSON, or not an object (400).
    """
    raw = request.content.read()
    if not raw.strip():
        raise OllamaError(400, "missing request body")
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise OllamaError(400, f"invalid JSON in request body: {error}") from error
    if not isinstance(body, dict):
        raise OllamaError(400, "request body must be a JSON object")
    return body


def parse_keep_alive(value: Any) -> float:
    """
    Parse `keep_alive` (seconds as a number, or a Go duration such as `10m`).

    Returns:
        Seconds. A negative duration, Ollama's value for never unloading the model,
        becomes 100 years.
    """
    if value is None:
        return _DEFAULT_KEEP_ALIVE
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise OllamaError(400, f"invalid keep_alive duration {value!r}")
        seconds = float(match["number"]) * _DURATION_UNITS[match["unit"]]
    return _KEEP_ALIVE_FOREVER if seconds < 0 else seconds


def parse_max_tokens(value: Any) -> int | None:
    """
    Parse a token limit such as `num_predict`, where a negative value means none.

    Raises:
        OllamaError: The limit is not an integer (400).
    """
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise OllamaError(400, f"invalid token limit {value!r}: expected an integer")
    return value if value >= 0 else None


def respond_openai_error(request: Request, error: OllamaError) -> bytes:
    """
    Write an error in the OpenAI format that Ollama's `/v1` routes use.
    """
    error_types = {400: "invalid_request_error", 404: "not_found_error"}
    payload = {
        "error": {
            "message": error.message,
            "type": error_types.get(error.status, "api_error"),
            "param": None,
            "code": None,
        }
    }
    return respond_json(request, error.status, payload)
