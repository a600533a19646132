"""
Bad input from clients, sent as raw bytes over a loopback socket: each case gets an
Ollama-shaped error or a closed connection, never a 500 from exoproxy itself, and
never a traceback in the log.
"""

from __future__ import annotations

import gzip
import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.fault_daemon import (  # noqa: F401 (fixtures)
    GENERATE,
    captured_log,
    daemons,
    sleep,
    status_of,
    zone,
)

CLIENT_TIMEOUT = 0.5


class RawConnection(Protocol):
    """
    A client that sends bytes as they are and records every byte it gets back.
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)


@inlineCallbacks
def open_connection(port: int):
    connection = RawConnection()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), connection)
    return connection


@inlineCallbacks
def until_closed(connection: RawConnection, seconds: float):
    """
    Wait until the server closes the connection, and return what it sent; fail
    when it is still open after C{seconds}.
    """
    waited = 0.0
    while not connection.closed.called:
        if waited >= seconds:
            connection.transport.abortConnection()
            raise AssertionError(f"the connection was still open after {seconds} s")
        yield sleep(0.02)
        waited += 0.02
    return connection.received


def parse_response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    code = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        body = body[: int(headers[b"content-length"])]
    return code, headers, body


@pytest.fixture
def port(daemons):
    _, base_url = pytest_twisted.blockon(
        daemons.start(client_timeout=str(CLIENT_TIMEOUT))
    )
    return int(base_url.rsplit(":", 1)[1])


def request_bytes(
    method: bytes, target: bytes, body: bytes = b"", headers: bytes = b""
) -> bytes:
    return (
        method
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


# Each case: the request bytes, and the status of the Ollama-shaped error.
OLLAMA_ERRORS = {
    "malformed json": (
        request_bytes(b"POST", b"/api/generate", b'{"model": "m", "prompt": '),
        400,
    ),
    "json array": (request_bytes(b"POST", b"/api/chat", b"[1, 2]"), 400),
    "empty body": (request_bytes(b"POST", b"/api/generate"), 400),
    "invalid utf-8 json": (
        request_bytes(b"POST", b"/api/generate", b'"\xff\xfe"'),
        400,
    ),
    "broken gzip": (
        request_bytes(
            b"POST",
            b"/api/generate",
            gzip.compress(GENERATE)[:20],
            b"Content-Encoding: gzip\r\n",
        ),
        400,
    ),
    "unknown encoding": (
        request_bytes(b"POST", b"/api/generate", GENERATE, b"Content-Encoding: br\r\n"),
        415,
    ),
    "unknown method": (request_bytes(b"BREW", b"/api/generate"), 405),
    "wrong method": (request_bytes(b"GET", b"/api/chat"), 405),
    "unknown path": (request_bytes(b"GET", b"/api/../../etc/passwd"), 404),
    "encoded non-utf-8 path": (request_bytes(b"GET", b"/api/%ff%fe"), 404),
    "encoded nul in path": (request_bytes(b"GET", b"/api/tags%00"), 404),
    "absolute target": (request_bytes(b"GET", b"http://example.com/api/tags"), 400),
    "bad blob digest": (request_bytes(b"POST", b"/api/blobs/sha256:xyz"), 404),
    "status by post": (request_bytes(b"POST", b"/status", b"{}"), 405),
}

# Requests that twisted.web's parser rejects before they reach a resource. The
# channel responds with a JSON 400, or 431 for a line over its limit, and closes.
REJECTED_BY_HTTP_PARSER = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "raw non-ascii path": request_bytes(b"GET", b"/api/\xff\xfe"),
    "huge header": request_bytes(
        b"GET", b"/api/tags", headers=b"X-Big: " + b"a" * 70000 + b"\r\n"
    ),
    "too many headers": request_bytes(
        b"GET", b"/api/tags", headers=b"".join(b"X-%d: 1\r\n" % i for i in range(600))
    ),
    "invalid content length": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n"
    ),
    "length and chunked": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "broken chunk": (
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n{}\r\n0\r\n\r\n"
    ),
    "header without colon": (
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"
    ),
    "http2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


def assert_clean_log(captured_log) -> None:
    assert captured_log.failures() == []
    assert "Traceback" not in captured_log.text()


@pytest.mark.parametrize("case", sorted(OLLAMA_ERRORS))
@pytest_twisted.inlineCallbacks
def test_bad_request_gets_ollama_error(port, captured_log, case):
    raw, expected = OLLAMA_ERRORS[case]
    connection = yield open_connection(port)
    connection.transport.write(raw)
    received = yield until_closed(connection, 5)

    code, headers, body = parse_response(received)
    assert code == expected
    assert headers[b"content-type"].startswith(b"application/json")
    assert isinstance(json.loads(body)["error"], str)
    assert_clean_log(captured_log)


@pytest.mark.parametrize("case", sorted(REJECTED_BY_HTTP_PARSER))
@pytest_twisted.inlineCallbacks
def test_malformed_http_gets_json_error(port, captured_log, case):
    connection = yield open_connection(port)
    connection.transport.write(REJECTED_BY_HTTP_PARSER[case])
    received = yield until_closed(connection, 5)

    code, headers, body = parse_response(received)
    assert code == (431 if case == "huge header" else 400)
    assert headers[b"content-type"].startswith(b"application/json")
    assert isinstance(json.loads(body)["error"], str)
    assert_clean_log(captured_log)


@pytest.mark.parametrize("method, expected", [(b"OPTIONS", 200), (b"GET", 405)])
@pytest_twisted.inlineCallbacks
def test_asterisk_target_answered_by_twisted(port, captured_log, method, expected):
    # twisted.web responds to a request for "*" itself, as RFC 9110 allows for a
    # server-wide OPTIONS, before any resource gets it.
    connection = yield open_connection(port)
    connection.transport.write(request_bytes(method, b"*"))
    received = yield until_closed(connection, 5)
    code, _, _ = parse_response(received)
    assert code == expected
    assert_clean_log(captured_log)


@pytest.mark.parametrize(
    "partial",
    [
        b"POST /api/gen",
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\n",
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    ],
    ids=["request line", "headers", "body"],
)
@pytest_twisted.inlineCallbacks
def test_stalled_client_disconnected(port, captured_log, partial):
    connection = yield open_connection(port)
    connection.transport.write(partial)
    started = time.monotonic()
    yield until_closed(connection, CLIENT_TIMEOUT + 3)
    assert time.monotonic() - started >= CLIENT_TIMEOUT * 0.9
    assert_clean_log(captured_log)


@pytest_twisted.inlineCallbacks
def test_trickled_body_still_served(port, captured_log):
    """
    A slow client that keeps sending within the timeout is served normally.
    """
    connection = yield open_connection(port)
    raw = request_bytes(b"POST", b"/api/generate", b"[not json]")
    for index in range(0, len(raw), 20):
        connection.transport.write(raw[index : index + 20])
        yield sleep(CLIENT_TIMEOUT / 5)
    received = yield until_closed(connection, 5)
    code, _, _ = parse_response(received)
    assert code == 400
    assert_clean_log(captured_log)


@pytest_twisted.inlineCallbacks
def test_bad_input_leaves_daemon_idle(daemons, zone, captured_log):
    _, base_url = yield daemons.start()
    port = int(base_url.rsplit(":", 1)[1])
    for raw, _ in OLLAMA_ERRORS.values():
        connection = yield open_connection(port)
        connection.transport.write(raw)
        yield until_closed(connection, 5)

    status = yield status_of(base_url)
    assert status["provisioning_status"] == "idle"
    assert status["requests_in_flight"] == 0
    assert zone.calls("create-instance") == []
    assert_clean_log(captured_log)
