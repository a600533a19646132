"""
A scriptable fake Ollama upstream and a raw HTTP client for the proxy tests.

`ScriptedUpstream` listens on 127.0.0.1 and responds to each request with a `Script`.
A script gives the exact status line, headers and body pieces, each sent after a
chosen delay, with chunked framing or a `Content-Length`, and an optional close or
abort. The upstream records every request it receives (request line, headers, body
length and SHA-256, the body bytes up to a limit) and when each connection opened and
closed. Requests with no script get the responses of Ollama's router: 404 for an
unknown path and 405 with an `Allow` header for a known path with another method. Requests that carry an
`Origin` header get the CORS headers, preflight responses and 403s of Ollama's default
configuration.

`RawClient` sends one request over a fresh loopback connection and records the
response exactly as it arrived: every header line, whether the body was chunked, each
body piece with its arrival time, and whether the response ended cleanly or was cut.

All times are `time.monotonic()` values, so the upstream's send times and the client's
arrival times can be compared directly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from fnmatch import fnmatchcase
from http import HTTPStatus
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IPullProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

Headers = list[tuple[str, str]]

LAST_CHUNK = b"0\r\n\r\n"

# Allowed browser origins of Ollama's default configuration (AllowedOrigins in
# envconfig/config.go of github.com/ollama/ollama): localhost, 127.0.0.1 and 0.0.0.0
# over http or https with any port, and the desktop-application schemes.
OLLAMA_DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for scheme in ("http", "https")
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

# The preflight response of gin-contrib/cors with `cors.DefaultConfig()` and the
# `AllowHeaders` list of Ollama's server/routes.go.
OLLAMA_CORS_ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
OLLAMA_CORS_ALLOW_HEADERS = ",".join(
    (
        "Authorization",
        "Content-Type",
        "User-Agent",
        "Accept",
        "X-Requested-With",
        "OpenAI-Beta",
        "x-stainless-arch",
        "x-stainless-async",
        "x-stainless-lang",
        "x-stainless-os",
        "x-stainless-package-version",
        "x-stainless-retry-count",
        "x-stainless-runtime",
        "x-stainless-runtime-version",
        "x-stainless-timeout",
    )
)
OLLAMA_CORS_MAX_AGE = "43200"

# Ollama's routes and their methods, so that an unscripted request gets the 404 or the
# 405 that Ollama's gin router sends. A trailing `*` matches any suffix.
OLLAMA_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
    "/api/pull": ("POST",),
    "/api/push": ("POST",),
    "/api/create": ("POST",),
    "/api/copy": ("POST",),
    "/api/show": ("POST",),
    "/api/delete": ("DELETE",),
    "/api/blobs/*": ("HEAD", "POST"),
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/embeddings": ("POST",),
    "/v1/models": ("GET",),
    "/v1/models/*": ("GET",),
}


def now() -> float:
    """Return the clock that every timestamp in these tests uses."""
    return time.monotonic()


class Event:
    """A one-shot event that any number of callers can wait for."""

    def __init__(self) -> None:
        self.is_set = False
        self.value: Any = None
        self._waiters: list[Deferred[Any]] = []

    def set(self, value: Any = None) -> None:
        """Fire the event with `value`. Calls after the first do nothing."""
        if self.is_set:
            return
        self.is_set = True
        self.value = value
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(value)

    def wait(self) -> Deferred[Any]:
        """Return a new Deferred that fires with the value, and may be cancelled."""
        if self.is_set:
            return succeed(self.value)
        waiter: Deferred[Any] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter


class HTTPParseError(Exception):
    """The bytes received are not a valid HTTP/1.1 message."""


def _find_header(headers: Headers, name: str) -> list[str]:
    lowered = name.lower()
    return [value for key, value in headers if key.lower() == lowered]


class _MessageParser:
    """Parse HTTP/1.1 messages incrementally and report each part as it arrives.

    Body bytes are passed to `on_body` as soon as their framing is decoded, so the
    owner sees the exact arrival time of every piece. Messages follow each other on
    one connection. For responses, the owner sets `no_body` before the head arrives
    when the request was `HEAD`.
    """

    def __init__(
        self,
        *,
        is_response: bool,
        on_head: Callable[[str, Headers], None],
        on_body: Callable[[bytes], None],
        on_end: Callable[[], None],
    ) -> None:
        self.is_response = is_response
        self.no_body = False
        self.chunked = False
        self._on_head = on_head
        self._on_body = on_body
        self._on_end = on_end
        self._buffer = bytearray()
        self._state = "head"
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        """Consume `data`, calling the callbacks for every part it completes."""
        self._buffer += data
        while self._step():
            pass

    def connection_lost(self) -> bool:
        """Return whether the connection's end also ends the current message cleanly."""
        if self._state == "until_close":
            self._state = "head"
            self._on_end()
            return True
        return self._state == "head" and not self._buffer

    def _step(self) -> bool:
        buffer = self._buffer
        if self._state == "head":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    raise HTTPParseError("message head is longer than 64 KiB")
                return False
            head = bytes(buffer[:end]).decode("latin-1")
            del buffer[: end + 4]
            self._read_head(head)
            return True

        if self._state in ("length", "chunk_data"):
            if not buffer:
                return False
            size = min(self._remaining, len(buffer))
            piece = bytes(buffer[:size])
            del buffer[:size]
            self._remaining -= size
            self._on_body(piece)
            if self._remaining == 0:
                if self._state == "length":
                    self._end_message()
                else:
                    self._state = "chunk_crlf"
            return True

        if self._state == "chunk_crlf":
            if len(buffer) < 2:
                return False
            if buffer[:2] != b"\r\n":
                raise HTTPParseError("chunk data is not followed by CRLF")
            del buffer[:2]
            self._state = "chunk_size"
            return True

        if self._state == "chunk_size":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            line = bytes(buffer[:end]).split(b";", 1)[0].strip()
            del buffer[: end + 2]
            try:
                self._remaining = int(line, 16)
            except ValueError:
                raise HTTPParseError(f"invalid chunk size line {line!r}") from None
            self._state = "chunk_data" if self._remaining else "trailers"
            return True

        if self._state == "trailers":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            del buffer[: end + 2]
            if end == 0:
                self._end_message()
            return True

        if self._state == "until_close":
            if not buffer:
                return False
            piece = bytes(buffer)
            buffer.clear()
            self._on_body(piece)
            return True

        raise AssertionError(f"unknown parser state {self._state}")

    def _read_head(self, head: str) -> None:
        start_line, *header_lines = head.split("\r\n")
        headers: Headers = []
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise HTTPParseError(f"invalid header line {line!r}")
            headers.append((name, value.strip()))

        status = 0
        if self.is_response:
            parts = start_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise HTTPParseError(f"invalid status line {start_line!r}")
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                return

        self._on_head(start_line, headers)

        transfer_encoding = ",".join(_find_header(headers, "transfer-encoding"))
        lengths = _find_header(headers, "content-length")
        self.chunked = "chunked" in transfer_encoding.lower()
        if self.is_response and (self.no_body or status in (204, 304)):
            self._end_message()
        elif self.chunked:
            self._state = "chunk_size"
        elif lengths:
            if len(set(lengths)) != 1:
                raise HTTPParseError(f"conflicting Content-Length values {lengths}")
            self._remaining = int(lengths[0])
            if self._remaining:
                self._state = "length"
            else:
                self._end_message()
        elif self.is_response:
            self._state = "until_close"
        else:
            self._end_message()

    def _end_message(self) -> None:
        self._state = "head"
        self._on_end()


@dataclass
class Step:
    """One scripted action of the upstream, taken `delay` seconds after the last."""

    delay: float
    kind: str
    data: bytes = b""
    status: int = 0
    headers: Headers = field(default_factory=list)


class Script:
    """The upstream's response to one request, built step by step.

    Every delay counts from the previous step. A script that neither closes nor aborts
    leaves the connection open for the next request once its last step has run.
    """

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def head(
        self, status: int, headers: Iterable[tuple[str, str]] = (), delay: float = 0.0
    ) -> Script:
        """Send the status line and headers, with `Date` and CORS headers added."""
        self.steps.append(Step(delay, "head", status=status, headers=list(headers)))
        return self

    def raw(self, data: bytes, delay: float = 0.0) -> Script:
        """Send `data` as it is, with no framing."""
        self.steps.append(Step(delay, "raw", data=data))
        return self

    def body(self, data: bytes, delay: float = 0.0) -> Script:
        """Send body bytes of a `Content-Length` response and record them as sent."""
        self.steps.append(Step(delay, "body", data=data))
        return self

    def chunk(self, data: bytes, delay: float = 0.0) -> Script:
        """Send `data` as one chunk of a chunked body and record it as sent."""
        self.steps.append(Step(delay, "chunk", data=data))
        return self

    def end_chunks(self, delay: float = 0.0) -> Script:
        """Send the last chunk, which ends a chunked body."""
        self.steps.append(Step(delay, "raw", data=LAST_CHUNK))
        return self

    def wait(self, delay: float) -> Script:
        """Stay silent for `delay` seconds."""
        self.steps.append(Step(delay, "wait"))
        return self

    def close(self, delay: float = 0.0) -> Script:
        """Close the connection cleanly after the bytes already written."""
        self.steps.append(Step(delay, "close"))
        return self

    def abort(self, delay: float = 0.0) -> Script:
        """Reset the connection at once."""
        self.steps.append(Step(delay, "abort"))
        return self


def json_bytes(value: Any) -> bytes:
    """Serialize `value` compactly, as Go's encoding/json does."""
    return json.dumps(value, separators=(",", ":")).encode()


def json_response(
    value: Any, status: int = 200, delay: float = 0.0, headers: Headers | None = None
) -> Script:
    """Build Ollama's response of one JSON object with a `Content-Length`."""
    body = value if isinstance(value, bytes) else json_bytes(value)
    all_headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *(headers or []),
    ]
    return Script().head(status, all_headers, delay=delay).body(body)


def streamed_lines(
    lines: Iterable[bytes],
    interval: float,
    *,
    first_delay: float = 0.0,
    content_type: str = "application/x-ndjson",
    headers: Headers | None = None,
) -> Script:
    """Build a chunked stream that sends each line as one chunk, `interval` apart.

    The head goes out together with the first line after `first_delay`, as Ollama's
    streaming handlers write it.
    """
    all_headers = [
        ("Content-Type", content_type),
        ("Transfer-Encoding", "chunked"),
        *(headers or []),
    ]
    script = Script().head(200, all_headers, delay=first_delay)
    for index, line in enumerate(lines):
        script.chunk(line, delay=0.0 if index == 0 else interval)
    return script.end_chunks()


def ndjson_lines(count: int, size: int = 80, model: str = "m") -> list[bytes]:
    """Return `count` chat progress lines of about `size` bytes, the last one done."""
    lines = []
    for index in range(count):
        done = index == count - 1
        record = {
            "model": model,
            "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": ""},
            "done": done,
        }
        filler = size - len(json_bytes(record)) - 1 - len(str(index))
        record["message"]["content"] = f"{index}" + "x" * max(filler, 0)
        lines.append(json_bytes(record) + b"\n")
    return lines


def sse_chat_events(count: int, model: str = "m") -> list[bytes]:
    """Return `count` OpenAI chat completion chunk events and the closing `[DONE]`."""
    events = []
    for index in range(count):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1735689600,
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": f"token{index} "},
                    "finish_reason": "stop" if index == count - 1 else None,
                }
            ],
        }
        events.append(b"data: " + json_bytes(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


@dataclass
class UpstreamConnection:
    """One TCP connection that the upstream accepted."""

    opened_at: float
    closed_at: float | None = None
    closed: Event = field(default_factory=Event)
    requests: list[ReceivedRequest] = field(default_factory=list)


@dataclass
class ReceivedRequest:
    """One request as the upstream received it, and what the upstream sent back."""

    method: str
    target: str
    version: str
    headers: Headers
    connection: UpstreamConnection
    head_at: float
    body_store_limit: int
    body_chunked: bool = False
    body_parts: list[bytes] = field(default_factory=list)
    body_length: int = 0
    first_body_at: float | None = None
    complete_at: float | None = None
    complete: Event = field(default_factory=Event)
    sent: list[tuple[float, bytes]] = field(default_factory=list)
    head_sent_at: float | None = None
    _sha256: Any = field(default_factory=hashlib.sha256)

    @property
    def path(self) -> str:
        """The request target without its query string."""
        return self.target.partition("?")[0]

    @property
    def body(self) -> bytes:
        """The stored body, which is only the first `body_store_limit` bytes."""
        return b"".join(self.body_parts)

    @property
    def body_sha256(self) -> str:
        """The SHA-256 of the whole body received so far, in hex."""
        return self._sha256.hexdigest()

    def header(self, name: str) -> str | None:
        """Return the value of header `name` or None, and raise if it is repeated."""
        values = self.header_values(name)
        if len(values) > 1:
            raise AssertionError(f"header {name} repeated: {values}")
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Return every value of header `name`, in order."""
        return _find_header(self.headers, name)

    def json(self) -> Any:
        """Parse the body as JSON, and raise ValueError when it is not valid JSON."""
        return json.loads(self.body)

    def add_body(self, piece: bytes) -> None:
        """Count, hash and, within the limit, store one body piece."""
        if self.first_body_at is None:
            self.first_body_at = now()
        self._sha256.update(piece)
        stored = self.body_length
        self.body_length += len(piece)
        if stored < self.body_store_limit:
            self.body_parts.append(piece[: self.body_store_limit - stored])


Handler = Script | Callable[[ReceivedRequest], Script]


def _origin_allowed(origin: str, allowed: Iterable[str]) -> bool:
    return any(fnmatchcase(origin, pattern) for pattern in allowed)


class _UpstreamProtocol(Protocol):
    """Serve one connection of `ScriptedUpstream`, one request at a time."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        self._upstream = upstream
        self._parser = _MessageParser(
            is_response=False,
            on_head=self._head_received,
            on_body=self._body_received,
            on_end=self._request_received,
        )
        self._current: ReceivedRequest | None = None
        self._queue: list[ReceivedRequest] = []
        self._busy = False
        self._closing = False
        self._pending_call: IDelayedCall | None = None
        self.record = UpstreamConnection(opened_at=now())

    def connectionMade(self) -> None:
        self._upstream.connections.append(self.record)
        self._upstream._protocols.add(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed(data)
        except HTTPParseError as error:
            log.warn("Fake upstream received invalid HTTP: {error}", error=error)
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
            )
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if self._pending_call is not None and self._pending_call.active():
            self._pending_call.cancel()
        self._pending_call = None
        self._upstream._protocols.discard(self)
        self.record.closed_at = now()
        self.record.closed.set(self.record.closed_at)

    def _head_received(self, start_line: str, headers: Headers) -> None:
        method, _, rest = start_line.partition(" ")
        target, _, version = rest.rpartition(" ")
        request = ReceivedRequest(
            method=method,
            target=target,
            version=version,
            headers=headers,
            connection=self.record,
            head_at=now(),
            body_store_limit=self._upstream.body_store_limit,
            body_chunked=self._parser.chunked,
        )
        self._current = request
        self.record.requests.append(request)
        self._upstream._add_request(request)
        expect = (request.header("Expect") or "").lower()
        if expect == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body_received(self, piece: bytes) -> None:
        assert self._current is not None
        self._current.add_body(piece)

    def _request_received(self) -> None:
        request = self._current
        assert request is not None
        request.body_chunked = request.body_chunked or self._parser.chunked
        request.complete_at = now()
        request.complete.set(request)
        self._current = None
        self._queue.append(request)
        if not self._busy:
            self._answer_next()

    def _answer_next(self) -> None:
        if not self._queue or self._closing:
            self._busy = False
            return
        self._busy = True
        request = self._queue.pop(0)
        steps = list(self._upstream.script_for(request).steps)
        self._run_steps(request, steps)

    def _run_steps(self, request: ReceivedRequest, steps: list[Step]) -> None:
        if not steps:
            connection_header = (request.header("Connection") or "").lower()
            if "close" in connection_header:
                self._closing = True
                self.transport.loseConnection()
                return
            self._answer_next()
            return
        step = steps.pop(0)
        self._pending_call = self._upstream.clock.callLater(
            step.delay, self._take_step, request, step, steps
        )

    def _take_step(
        self, request: ReceivedRequest, step: Step, remaining: list[Step]
    ) -> None:
        self._pending_call = None
        if step.kind == "head":
            headers = self._upstream.response_headers(request, step.headers)
            self.transport.write(_serialize_head(step.status, headers))
            request.head_sent_at = now()
        elif step.kind == "raw":
            self.transport.write(step.data)
        elif step.kind == "body":
            self.transport.write(step.data)
            request.sent.append((now(), step.data))
        elif step.kind == "chunk":
            self.transport.write(b"%x\r\n%s\r\n" % (len(step.data), step.data))
            request.sent.append((now(), step.data))
        elif step.kind == "close":
            self._closing = True
            self.transport.loseConnection()
            return
        elif step.kind == "abort":
            self._closing = True
            self.transport.abortConnection()
            return
        self._run_steps(request, remaining)


def _serialize_head(status: int, headers: Headers) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ScriptedUpstream:
    """A fake Ollama server on 127.0.0.1 whose every response a test scripts.

    Args:
        reactor: The reactor to listen with, which must provide IReactorTCP.
        clock: The clock for every scripted delay.
        body_store_limit: How many body bytes of each request to keep in memory. The
            length and SHA-256 always cover the whole body.
    """

    def __init__(
        self, reactor: Any, clock: IReactorTime, body_store_limit: int = 1 << 20
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.body_store_limit = body_store_limit
        self.cors_origins: tuple[str, ...] | None = OLLAMA_DEFAULT_ORIGINS
        self.requests: list[ReceivedRequest] = []
        self.connections: list[UpstreamConnection] = []
        self._routes: list[tuple[str, str, Handler]] = []
        self._protocols: set[_UpstreamProtocol] = set()
        self._request_waiters: list[tuple[int, Event]] = []
        self._port: IListeningPort | None = None

    @property
    def port(self) -> int:
        """The TCP port that the upstream listens on."""
        assert self._port is not None, "the upstream is not listening"
        return self._port.getHost().port

    @property
    def url(self) -> str:
        """The base URL to pass to exoproxy as `--backend-url`."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen on an ephemeral port of 127.0.0.1."""
        factory = Factory.forProtocol(lambda: _UpstreamProtocol(self))
        self._port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")

    async def stop(self) -> None:
        """Stop listening, reset every open connection and cancel every timer."""
        if self._port is not None:
            await self._port.stopListening()
        closing = []
        for protocol in list(self._protocols):
            closing.append(protocol.record.closed.wait())
            protocol.transport.abortConnection()
        for waiter in closing:
            await waiter

    def route(self, method: str, path: str, handler: Handler) -> None:
        """Respond to `method path` with `handler`.

        A trailing `*` in `path` matches any suffix, and the method `*` matches any
        method. A handler is a Script, used for every matching request, or a function
        that builds a Script from the complete request. Later routes take precedence.
        """
        self._routes.insert(0, (method.upper(), path, handler))

    def when_requests(self, count: int = 1) -> Deferred[ReceivedRequest]:
        """Return a Deferred that fires with request number `count`.

        It fires once the head of that request has arrived, before its body.
        """
        event = Event()
        if len(self.requests) >= count:
            event.set(self.requests[count - 1])
        else:
            self._request_waiters.append((count, event))
        return event.wait()

    def script_for(self, request: ReceivedRequest) -> Script:
        """Return the Script that responds to `request`."""
        origin = request.header("Origin")
        if origin is not None and self.cors_origins is not None:
            if not _origin_allowed(origin, self.cors_origins):
                return Script().head(403, [("Content-Length", "0")])
            preflight = request.header("Access-Control-Request-Method") is not None
            if request.method == "OPTIONS" and preflight:
                return Script().head(204, _preflight_headers(origin))

        for method, pattern, handler in self._routes:
            method_matches = method in ("*", request.method)
            if method_matches and fnmatchcase(request.path, pattern):
                return handler if isinstance(handler, Script) else handler(request)

        return _router_default(request)

    def response_headers(self, request: ReceivedRequest, headers: Headers) -> Headers:
        """Add the `Date` and CORS headers that Ollama adds to a scripted head."""
        names = {name.lower() for name, _ in headers}
        result = list(headers)
        if "date" not in names:
            result.append(("Date", formatdate(usegmt=True)))
        origin = request.header("Origin")
        cors_applies = (
            self.cors_origins is not None
            and origin is not None
            and _origin_allowed(origin, self.cors_origins)
        )
        if cors_applies and "access-control-allow-origin" not in names:
            result.append(("Access-Control-Allow-Origin", origin))
            result.append(("Vary", "Origin"))
        return result

    def _add_request(self, request: ReceivedRequest) -> None:
        self.requests.append(request)
        waiting = []
        for count, event in self._request_waiters:
            if len(self.requests) >= count:
                event.set(self.requests[count - 1])
            else:
                waiting.append((count, event))
        self._request_waiters = waiting


def _preflight_headers(origin: str) -> Headers:
    return [
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Methods", OLLAMA_CORS_ALLOW_METHODS),
        ("Access-Control-Allow-Headers", OLLAMA_CORS_ALLOW_HEADERS),
        ("Access-Control-Max-Age", OLLAMA_CORS_MAX_AGE),
        ("Vary", "Origin"),
        ("Vary", "Access-Control-Request-Method"),
        ("Vary", "Access-Control-Request-Headers"),
    ]


def _router_default(request: ReceivedRequest) -> Script:
    """Respond to an unscripted request as Ollama's gin router would, or with a 500."""
    methods: tuple[str, ...] = ()
    for pattern, route_methods in OLLAMA_ROUTES.items():
        if fnmatchcase(request.path, pattern):
            methods = route_methods
            break

    if not methods:
        body = b"404 page not found"
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        return Script().head(404, headers).body(body)

    if request.method not in methods:
        body = b"405 method not allowed"
        headers = [
            ("Allow", ", ".join(methods)),
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
        ]
        return Script().head(405, headers).body(body)

    message = f"the fake upstream has no script for {request.method} {request.path}"
    return json_response({"error": message}, status=500)


@dataclass
class RawResponse:
    """A response as the raw client received it."""

    status_line: str = ""
    headers: Headers = field(default_factory=list)
    chunked: bool = False
    head_at: float | None = None
    parts: list[tuple[float, bytes]] = field(default_factory=list)
    complete: bool = False
    complete_at: float | None = None
    trailing: bytes = b""

    @property
    def status(self) -> int:
        """The status code of the final response, or 0 when no head arrived."""
        if not self.status_line:
            return 0
        return int(self.status_line.split(" ")[1])

    @property
    def body(self) -> bytes:
        """The body received so far, with chunked framing removed."""
        return b"".join(piece for _, piece in self.parts)

    def header(self, name: str) -> str | None:
        """Return the value of header `name` or None, and raise if it is repeated."""
        values = self.header_values(name)
        if len(values) > 1:
            raise AssertionError(f"header {name} repeated: {values}")
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Return every value of header `name`, in order."""
        return _find_header(self.headers, name)

    def media_type(self) -> str | None:
        """Return the `Content-Type` without parameters, in lower case."""
        value = self.header("Content-Type")
        return value.split(";")[0].strip().lower() if value is not None else None

    def json(self) -> Any:
        """Parse the body as JSON, and raise ValueError when it is not valid JSON."""
        return json.loads(self.body)


def line_arrivals(parts: Iterable[tuple[float, bytes]]) -> list[tuple[float, bytes]]:
    """Split timed body pieces into lines, each timed by the piece that ended it."""
    lines = []
    pending = b""
    for at, piece in parts:
        pending += piece
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            lines.append((at, line + b"\n"))
    return lines


def sse_event_arrivals(
    parts: Iterable[tuple[float, bytes]],
) -> list[tuple[float, bytes]]:
    """Split timed body pieces into server-sent events, each ending in a blank line."""
    events = []
    pending = b""
    for at, piece in parts:
        pending += piece
        while b"\n\n" in pending:
            event, _, pending = pending.partition(b"\n\n")
            events.append((at, event + b"\n\n"))
    return events


@implementer(IPullProducer)
class GeneratedBody:
    """A request body of `size` bytes made on the fly from one repeated block.

    Args:
        size: The body length in bytes.
        chunked: Whether to send it with chunked framing.
        seed: Bytes that make the block, so two bodies can differ.
        piece_size: How many body bytes to write each time the transport is ready
            for more.
    """

    def __init__(
        self,
        size: int,
        *,
        chunked: bool,
        seed: bytes = b"exoproxy",
        piece_size: int = 256 * 1024,
    ) -> None:
        self.size = size
        self.chunked = chunked
        self.block = hashlib.shake_256(seed).digest(piece_size)
        self.sent = 0
        self.finished_at: float | None = None
        self._transport: Any = None

    def sha256(self) -> str:
        """Compute the SHA-256 of the whole body, in hex, without holding it."""
        digest = hashlib.sha256()
        for piece in self._pieces(0):
            digest.update(piece)
        return digest.hexdigest()

    def start(self, transport: Any) -> None:
        """Write the body to `transport` as fast as the transport takes it."""
        self._transport = transport
        transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent >= self.size:
            return
        piece = next(self._pieces(self.sent))
        self.sent += len(piece)
        if self.chunked:
            self._transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        else:
            self._transport.write(piece)
        if self.sent >= self.size:
            if self.chunked:
                self._transport.write(LAST_CHUNK)
            self.finished_at = now()
            self._transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.sent = self.size

    def _pieces(self, offset: int) -> Iterator[bytes]:
        while offset < self.size:
            piece = self.block[: self.size - offset]
            offset += len(piece)
            yield piece


class RawClient(Protocol):
    """Send one HTTP/1.1 request and record the response exactly as it arrives."""

    def __init__(
        self, request_head: bytes, body: bytes | GeneratedBody, method: str
    ) -> None:
        self.request_head = request_head
        self.request_body = body
        self.response = RawResponse()
        self.head_received = Event()
        self.done = Event()
        self.lost = Event()
        self.lost_at: float | None = None
        self.parse_error: HTTPParseError | None = None
        self._body_waiters: list[tuple[Callable[[bytes], bool], Event]] = []
        self._parser = _MessageParser(
            is_response=True,
            on_head=self._head,
            on_body=self._body,
            on_end=self._end,
        )
        self._parser.no_body = method == "HEAD"

    def connectionMade(self) -> None:
        self.transport.write(self.request_head)
        if isinstance(self.request_body, GeneratedBody):
            self.request_body.start(self.transport)
        elif self.request_body:
            self.transport.write(self.request_body)

    def dataReceived(self, data: bytes) -> None:
        if self.response.complete:
            self.response.trailing += data
            return
        try:
            self._parser.feed(data)
        except HTTPParseError as error:
            self.parse_error = error
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost_at = now()
        if not self.response.complete and self.response.head_at is not None:
            self._parser.connection_lost()
        self.done.set(self.response)
        for _, event in self._body_waiters:
            event.set(self.response.body)
        self.lost.set(self.lost_at)

    def when_body(self, predicate: Callable[[bytes], bool]) -> Deferred[bytes]:
        """Return a Deferred that fires with the body once `predicate(body)` is true.

        It also fires when the connection ends first.
        """
        event = Event()
        if predicate(self.response.body) or self.done.is_set:
            event.set(self.response.body)
        else:
            self._body_waiters.append((predicate, event))
        return event.wait()

    def when_lines(self, count: int) -> Deferred[bytes]:
        """Return a Deferred that fires once `count` whole lines of body arrived."""
        return self.when_body(lambda body: body.count(b"\n") >= count)

    def close(self) -> None:
        """Close the connection as a client closing its socket does."""
        self.transport.loseConnection()

    def abort(self) -> None:
        """Reset the connection."""
        self.transport.abortConnection()

    def _head(self, start_line: str, headers: Headers) -> None:
        self.response.status_line = start_line
        self.response.headers = headers
        self.response.head_at = now()
        self.head_received.set(self.response)

    def _body(self, piece: bytes) -> None:
        self.response.parts.append((now(), piece))
        self.response.chunked = self._parser.chunked
        if self._body_waiters:
            body = self.response.body
            waiting = []
            for predicate, event in self._body_waiters:
                if predicate(body):
                    event.set(body)
                else:
                    waiting.append((predicate, event))
            self._body_waiters = waiting

    def _end(self) -> None:
        self.response.chunked = self._parser.chunked
        self.response.complete = True
        self.response.complete_at = now()
        self.done.set(self.response)


def build_request(
    method: str,
    target: str,
    host: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | GeneratedBody | None = None,
) -> bytes:
    """Serialize a request head, adding `Host` and the body framing when absent."""
    all_headers = list(headers)
    names = {name.lower() for name, _ in all_headers}
    if "host" not in names:
        all_headers.insert(0, ("Host", host))
    framed = "content-length" in names or "transfer-encoding" in names
    if isinstance(body, GeneratedBody) and not framed:
        if body.chunked:
            all_headers.append(("Transfer-Encoding", "chunked"))
        else:
            all_headers.append(("Content-Length", str(body.size)))
    elif isinstance(body, bytes) and not framed:
        all_headers.append(("Content-Length", str(len(body))))
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in all_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def open_raw_client(
    reactor: Any,
    port: int,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | GeneratedBody | None = None,
) -> RawClient:
    """Connect to 127.0.0.1:`port`, send one request and return the client."""
    host = f"127.0.0.1:{port}"
    head = build_request(method, target, host, headers, body)
    client = RawClient(head, body if body is not None else b"", method)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await connectProtocol(endpoint, client)
    return client
