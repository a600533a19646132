"""
Request heads that twisted.web rejects by default: long lines, large heads and
malformed request lines, sent over a raw loopback socket to a daemon.
"""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from exoproxy.channel import MAX_REQUEST_HEAD
from tests.daemon import simulated_arguments, start_daemon


@pytest.fixture
def daemon():
    started = pytest_twisted.blockon(start_daemon(simulated_arguments()))
    yield started
    pytest_twisted.blockon(started[0].stopService())


def exchange(base_url: str, request: bytes) -> bytes:
    """
    Send `request` on a new connection and return everything that comes back
    before the daemon closes it.
    """
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(target: bytes, extra_headers: bytes = b"") -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + extra_headers
        + b"Connection: close\r\n\r\n"
    )


@pytest_twisted.inlineCallbacks
def test_large_cookie_and_long_target_accepted(daemon):
    _, base_url = daemon
    cookie = b"Cookie: session=" + b"c" * 30_000 + b"\r\n"
    with_cookie = yield deferToThread(exchange, base_url, get(b"/status", cookie))
    long_target = b"/status?padding=" + b"p" * 30_000
    with_target = yield deferToThread(exchange, base_url, get(long_target))

    assert split_response(with_cookie)[0] == 200
    assert split_response(with_target)[0] == 200


@pytest_twisted.inlineCallbacks
def test_too_long_line_gets_json_431(daemon):
    _, base_url = daemon
    target = b"/status?padding=" + b"p" * (MAX_REQUEST_HEAD + 10)
    raw = yield deferToThread(exchange, base_url, get(target))
    after = yield deferToThread(exchange, base_url, get(b"/status"))

    status, headers, body = split_response(raw)
    assert status == 431
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert "longer than" in json.loads(body)["error"]
    assert split_response(after)[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"NONSENSE\r\nHost: 127.0.0.1\r\n\r\n",
        get(
            b"/status",
            b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 9000) for i in range(8)),
        ),
    ],
    ids=["non-ascii target", "no version", "head too large"],
)
@pytest_twisted.inlineCallbacks
def test_bad_request_head_gets_json_400(daemon, request_bytes):
    _, base_url = daemon
    raw = yield deferToThread(exchange, base_url, request_bytes)
    after = yield deferToThread(exchange, base_url, get(b"/status"))

    status, headers, body = split_response(raw)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert "invalid request" in json.loads(body)["error"]
    assert split_response(after)[0] == 200
