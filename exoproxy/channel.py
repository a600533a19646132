"""
The HTTP/1.1 channel of exoproxy's listeners: twisted.web's, with room for larger
request heads and an Ollama-style JSON error for a request head that it rejects.
"""

from __future__ import annotations

import json

from twisted.logger import Logger
from twisted.web.http import HTTPChannel

log = Logger()

#: The largest request line or header line, and the largest request head in all,
#: in bytes. twisted.web's default of 16 KiB can be less than the Cookie header that
#: a browser sends to a host that serves several web apps.
MAX_REQUEST_HEAD = 64 * 1024

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class ExoproxyChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that accepts request heads up to L{MAX_REQUEST_HEAD} bytes
    and responds to a rejected one with `{"error": "..."}` before it closes the
    connection.

    twisted.web (26.10) closes the connection without a response when one line is
    too long, and sends a bare `400 Bad Request` for a malformed request line or a
    request head that is too large.
    """

    MAX_LENGTH = MAX_REQUEST_HEAD
    totalHeadersSize = MAX_REQUEST_HEAD

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reject(
            431,
            f"a request or header line is longer than {MAX_REQUEST_HEAD} bytes",
        )

    # NOTE: this overrides a private method of twisted.web's HTTPChannel (26.10),
    # the one through which it rejects a malformed request or an oversized head. If a
    # later Twisted renames it, its bare 400 comes back, and tests/test_channel.py
    # fails.
    def _respondToBadRequestAndDisconnect(self) -> None:
        self._reject(
            400,
            "invalid request: malformed request line, headers or chunked body, or "
            f"a request head longer than {MAX_REQUEST_HEAD} bytes",
        )

    def _reject(self, code: int, message: str) -> None:
        body = json.dumps({"error": message}).encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, _REASONS[code], len(body), body)
        )
        peer = self.transport.getPeer()
        log.info(
            "Rejected a request from {client} with {status}: {reason}",
            client=getattr(peer, "host", str(peer)),
            status=code,
            reason=message,
        )
        self.loseConnection()


__all__ = ["MAX_REQUEST_HEAD", "ExoproxyChannel"]
