"""
The load generator's HTTP/1.1 client side: a response parser and the two asyncio
protocols that use it, one for NDJSON streams and one for small requests.

They work on raw sockets, without an HTTP library, because the load generator must
read 25,000 lines/s or more on one core and stay far from its own limit.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from array import array
from collections.abc import Callable

_STAMP = re.compile(rb'"sent_ns":(\d+)')
_DONE = b'"done":true'


class ProtocolError(ValueError):
    """
    A response is not valid HTTP/1.1.
    """


class ResponseParser:
    """
    Parse a sequence of HTTP/1.1 responses from the bytes of one connection.

    `on_body(data)` receives the decoded body as it arrives, and
    `on_complete(status)` is called at the end of each response. A body is framed by
    Content-Length or by chunked transfer coding. The parser does not support a body
    that ends with the connection, because neither exoproxy, nginx nor the upstream
    sends one.
    """

    def __init__(
        self, on_body: Callable[[bytes], None], on_complete: Callable[[int], None]
    ) -> None:
        self._on_body = on_body
        self._on_complete = on_complete
        self._buffer = bytearray()
        self._state = "head"
        self._status = 0
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        """
        Parse more bytes of the connection.

        Raises:
            ProtocolError: the bytes are not a valid response.
        """
        buffer = self._buffer
        buffer += data
        position = 0
        length = len(buffer)
        while position < length:
            state = self._state
            if state == "chunk data":
                consumed = min(length - position, self._remaining)
                self._on_body(bytes(buffer[position : position + consumed]))
                position += consumed
                self._remaining -= consumed
                if self._remaining == 0:
                    self._state = "chunk end"
            elif state == "chunk size":
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                try:
                    size = int(bytes(buffer[position:end]).split(b";")[0], 16)
                except ValueError:
                    raise ProtocolError(f"invalid chunk size {buffer[position:end]!r}")
                position = end + 2
                self._remaining = size
                self._state = "chunk data" if size else "trailer"
            elif state == "chunk end":
                if length - position < 2:
                    break
                if buffer[position : position + 2] != b"\r\n":
                    raise ProtocolError("missing CRLF after chunk data")
                position += 2
                self._state = "chunk size"
            elif state == "length data":
                consumed = min(length - position, self._remaining)
                self._on_body(bytes(buffer[position : position + consumed]))
                position += consumed
                self._remaining -= consumed
                if self._remaining == 0:
                    self._finish()
            elif state == "trailer":
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                if end == position:
                    self._finish()
                position = end + 2
            else:
                end = buffer.find(b"\r\n\r\n", position)
                if end < 0:
                    break
                self._parse_head(bytes(buffer[position:end]))
                position = end + 4
        del buffer[:position]

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"invalid status line {lines[0]!r}")
        self._status = int(parts[1])

        chunked = False
        content_length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-length":
                content_length = int(value)

        if chunked:
            self._state = "chunk size"
        elif content_length:
            self._state = "length data"
            self._remaining = content_length
        elif content_length == 0 or self._status in (204, 304):
            self._finish()
        else:
            raise ProtocolError("a response without Content-Length is not chunked")

    def _finish(self) -> None:
        self._state = "head"
        self._on_complete(self._status)


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StreamClient(asyncio.Protocol):
    """
    Send one streamed request and record the delay of every NDJSON line.

    The delay of a line is the CLOCK_MONOTONIC time at which it was read minus its
    `sent_ns` stamp. All lines read by one `data_received` call get one reading.
    Each line appends its delay to `delays` and its stamp to `stamps`.
    """

    def __init__(
        self, request: bytes, delays: array, stamps: array, finished: asyncio.Future
    ) -> None:
        self._request = request
        self._delays = delays
        self._stamps = stamps
        self._finished = finished
        self._parser = ResponseParser(self._body_received, self._complete)
        self._partial = b""
        self._now = 0
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.lines = 0
        self.first_read_ns: int | None = None
        self.last_read_ns: int | None = None
        self.last_stamp_ns: int | None = None
        self.done = False
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _set_nodelay(transport)
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._now = time.monotonic_ns()
        try:
            self._parser.feed(data)
        except ProtocolError as error:
            self._end(str(error))

    def _body_received(self, data: bytes) -> None:
        if b"\n" not in data:
            self._partial += data
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        now = self._now
        stamp = 0
        for line in lines:
            match = _STAMP.search(line)
            if match is None:
                self._end(f"a line has no sent_ns stamp: {line[:200]!r}")
                return
            stamp = int(match[1])
            self._delays.append(now - stamp)
            self._stamps.append(stamp)
            self.lines += 1
            if _DONE in line:
                self.done = True
        if self.first_read_ns is None:
            self.first_read_ns = now
        self.last_read_ns = now
        self.last_stamp_ns = stamp

    def _complete(self, status: int) -> None:
        self.status = status
        if status != 200:
            self._end(f"status {status}")
        elif not self.done:
            self._end("the stream ended without a done line")
        else:
            self._end(None)

    def _end(self, error: str | None) -> None:
        if self._finished.done():
            return
        self.error = error
        self._finished.set_result(self)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc}" if exc else "connection closed early")


class RequestClient(asyncio.Protocol):
    """
    Send requests one at a time over one keep-alive connection.
    """

    def __init__(self) -> None:
        self._parser = ResponseParser(self._body_received, self._complete)
        self._waiting: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.body_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _set_nodelay(transport)

    def send(self, request: bytes) -> asyncio.Future:
        """
        Send one request and return a Future that gets its status code.
        """
        self._waiting = asyncio.get_running_loop().create_future()
        self.body_bytes = 0
        self.transport.write(request)
        return self._waiting

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed(data)
        except ProtocolError as error:
            self._fail(error)

    def _body_received(self, data: bytes) -> None:
        self.body_bytes += len(data)

    def _complete(self, status: int) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.done():
            waiting.set_result(status)

    def _fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.done():
            waiting.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}"))
