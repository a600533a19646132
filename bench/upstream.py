"""
A fast Ollama-compatible upstream for the benchmark, run as its own process.

It serves the few routes that the benchmark uses:

- `POST /api/chat` streams `options.num_predict` NDJSON lines at `bench_rate` lines
  per second, then a final `"done": true` line, one chunk and one socket write per
  line, as Ollama does. Every line carries `sent_ns`, the CLOCK_MONOTONIC time in
  nanoseconds at which the line was written to the socket. On Linux that clock is
  shared by every process of the machine, so the load generator can subtract it
  from its own reading. With `"stream": false` it returns one JSON object.
- `POST /api/show` returns a fixed model description of about 1 KB.
- `POST /api/blobs/sha256:<hex>` reads and drops the body, then returns 201. The
  digest is not checked, so that hashing does not load the core the load generator
  runs on.
- `GET /` and `GET /api/version` return what Ollama returns.

Run it with `python -m bench.upstream --port PORT`; it serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import ipaddress
import itertools
import json
import signal
import socket
import time
from email.utils import formatdate

_SHOW_BODY = json.dumps(
    {
        "license": "Apache License Version 2.0",
        "modelfile": "FROM bench\nTEMPLATE {{ .Prompt }}\nPARAMETER stop <|end|>\n",
        "parameters": 'stop                           "<|end|>"',
        "template": "{{ if .System }}<|system|>{{ .System }}<|end|>{{ end }}"
        "<|user|>{{ .Prompt }}<|end|><|assistant|>",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "granite",
            "families": ["granite"],
            "parameter_size": "8.2B",
            "quantization_level": "Q4_K_M",
        },
        "model_info": {
            "general.architecture": "granite",
            "general.file_type": 15,
            "general.parameter_count": 8170848256,
            "granite.attention.head_count": 32,
            "granite.attention.head_count_kv": 8,
            "granite.block_count": 40,
            "granite.context_length": 131072,
            "granite.embedding_length": 4096,
            "granite.feed_forward_length": 12800,
            "tokenizer.ggml.model": "gpt2",
        },
        "capabilities": ["completion", "tools"],
        "modified_at": "2025-01-01T00:00:00.000000000Z",
    }
).encode()

_LINE = (
    b'{"model":"bench","created_at":"%s","message":{"role":"assistant",'
    b'"content":" token"},"done":false,"sent_ns":%d}\n'
)
_LAST_LINE = (
    b'{"model":"bench","created_at":"%s","message":{"role":"assistant",'
    b'"content":""},"done_reason":"stop","done":true,"total_duration":%d,'
    b'"load_duration":0,"prompt_eval_count":1,"prompt_eval_duration":0,'
    b'"eval_count":%d,"eval_duration":%d,"sent_ns":%d}\n'
)

# The loop checks the schedule at most this often, so that 25,000 lines/s do not
# need 25,000 timers/s. A late line is stamped when it is written, so the delay
# that the load generator measures does not include this lateness.
_TICK_NS = 500_000


def _created_at() -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()).encode()


class _Stream:
    """
    One paced `/api/chat` response.
    """

    def __init__(self, connection: _Connection, lines: int, interval_ns: int) -> None:
        self.connection = connection
        self.remaining = lines
        self.lines = lines
        self.interval_ns = interval_ns
        self.started_ns = time.monotonic_ns()
        self.due_ns = self.started_ns

    def send_next(self, created_at: bytes) -> bool:
        """
        Write the next line, and return whether more lines follow.
        """
        transport = self.connection.transport
        if transport is None or transport.is_closing():
            return False

        if self.remaining > 0:
            line = _LINE % (created_at, time.monotonic_ns())
            transport.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.remaining -= 1
            return True

        now = time.monotonic_ns()
        elapsed = now - self.started_ns
        line = _LAST_LINE % (created_at, elapsed, self.lines, elapsed, now)
        transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
        self.connection.response_finished()
        return False


class _Pacer:
    """
    The schedule of every stream's next line, kept in one heap.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[int, int, _Stream]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._created_at = _created_at()
        self._created_at_second = int(time.time())

    def add(self, stream: _Stream) -> None:
        heapq.heappush(self._heap, (stream.due_ns, next(self._order), stream))
        self._arm(time.monotonic_ns())

    def _arm(self, now_ns: int) -> None:
        if self._timer is not None or not self._heap:
            return
        delay_ns = max(self._heap[0][0] - now_ns, 0)
        self._timer = self._loop.call_later(delay_ns / 1e9, self._fire)

    def _fire(self) -> None:
        self._timer = None
        second = int(time.time())
        if second != self._created_at_second:
            self._created_at_second = second
            self._created_at = _created_at()

        heap = self._heap
        now = time.monotonic_ns()
        while heap and heap[0][0] <= now:
            _, _, stream = heapq.heappop(heap)
            if stream.send_next(self._created_at):
                stream.due_ns += stream.interval_ns
                heapq.heappush(heap, (stream.due_ns, next(self._order), stream))

        if heap:
            delay_ns = max(heap[0][0] - now, _TICK_NS)
            self._timer = self._loop.call_later(delay_ns / 1e9, self._fire)


class _Connection(asyncio.Protocol):
    """
    One HTTP/1.1 client connection, with keep-alive and one request at a time.
    """

    def __init__(self, pacer: _Pacer) -> None:
        self._pacer = pacer
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: tuple[bytes, bytes] | None = None
        self._body = bytearray()
        self._content_remaining = 0
        self._chunk_state: str | None = None
        self._chunk_remaining = 0
        self._responding = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._content_remaining and not self._buffer and not self._responding:
            # A large Content-Length body, such as a blob upload, is consumed
            # without being copied into the buffer.
            consumed = min(len(data), self._content_remaining)
            self._store_body(data if consumed == len(data) else data[:consumed])
            self._content_remaining -= consumed
            if self._content_remaining == 0:
                self._request_complete()
            data = data[consumed:]
        self._buffer += data
        self._parse()

    def _parse(self) -> None:
        while self.transport is not None and not self._responding:
            if self._head is None:
                progressed = self._parse_head()
            elif self._chunk_state is not None:
                progressed = self._parse_chunked()
            else:
                progressed = self._parse_content()
            if not progressed:
                return

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        del self._buffer[: end + 4]
        method, target, version = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()

        self._head = (method, target)
        self._body = bytearray()
        connection = headers.get(b"connection", b"").lower()
        self._close_after = connection == b"close" or version == b"HTTP/1.0"
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._chunk_state = "size"
            return True
        self._content_remaining = int(headers.get(b"content-length", b"0"))
        if self._content_remaining == 0:
            self._request_complete()
        return True

    def _parse_content(self) -> bool:
        if not self._buffer:
            return False
        consumed = min(len(self._buffer), self._content_remaining)
        self._store_body(bytes(self._buffer[:consumed]))
        del self._buffer[:consumed]
        self._content_remaining -= consumed
        if self._content_remaining == 0:
            self._request_complete()
        return True

    def _parse_chunked(self) -> bool:
        buffer = self._buffer
        if self._chunk_state == "size":
            end = buffer.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buffer[:end]).split(b";")[0], 16)
            del buffer[: end + 2]
            self._chunk_remaining = size
            self._chunk_state = "data" if size else "trailer"
            return True

        if self._chunk_state == "data":
            if not buffer:
                return False
            consumed = min(len(buffer), self._chunk_remaining)
            self._store_body(bytes(buffer[:consumed]))
            del buffer[:consumed]
            self._chunk_remaining -= consumed
            if self._chunk_remaining == 0:
                self._chunk_state = "end of data"
            return True

        if self._chunk_state == "end of data":
            if len(buffer) < 2:
                return False
            del buffer[:2]
            self._chunk_state = "size"
            return True

        # The trailer section ends with an empty line.
        end = buffer.find(b"\r\n")
        if end < 0:
            return False
        del buffer[: end + 2]
        if end == 0:
            self._chunk_state = None
            self._request_complete()
        return True

    def _store_body(self, data: bytes) -> None:
        if not self._head[1].startswith(b"/api/blobs/"):
            self._body += data

    def _request_complete(self) -> None:
        method, target = self._head
        body = bytes(self._body)
        self._head = None
        self._body = bytearray()
        self._responding = True
        self._route(method, target.split(b"?", 1)[0], body)

    def _route(self, method: bytes, path: bytes, body: bytes) -> None:
        if method == b"POST" and path == b"/api/chat":
            self._chat(body)
        elif method == b"POST" and path == b"/api/show":
            self._respond(200, b"application/json; charset=utf-8", _SHOW_BODY)
        elif method == b"POST" and path.startswith(b"/api/blobs/"):
            self._respond(201, b"text/plain; charset=utf-8", b"")
        elif method in (b"GET", b"HEAD") and path == b"/":
            self._respond(200, b"text/plain; charset=utf-8", b"Ollama is running")
        elif method == b"GET" and path == b"/api/version":
            self._respond(
                200, b"application/json; charset=utf-8", b'{"version":"0.12.0"}'
            )
        else:
            self._respond(404, b"text/plain; charset=utf-8", b"404 page not found")

    def _chat(self, body: bytes) -> None:
        try:
            request = json.loads(body)
            lines = int(request.get("options", {}).get("num_predict", 10))
            rate = float(request.get("bench_rate", 50))
        except (ValueError, TypeError, AttributeError) as error:
            message = json.dumps({"error": f"invalid request body: {error}"}).encode()
            self._respond(400, b"application/json; charset=utf-8", message)
            return

        if not request.get("stream", True):
            answer = _LAST_LINE % (_created_at(), 0, lines, 0, time.monotonic_ns())
            self._respond(200, b"application/json; charset=utf-8", answer.rstrip())
            return

        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: %s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % _date()
        )
        interval_ns = int(1e9 / rate) if rate > 0 else 0
        self._pacer.add(_Stream(self, max(lines, 0), interval_ns))

    def _respond(self, status: int, content_type: bytes, body: bytes) -> None:
        reason = {200: b"OK", 201: b"Created", 400: b"Bad Request"}.get(
            status, b"Not Found"
        )
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nDate: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (status, reason, content_type, _date(), len(body), body)
        )
        self.response_finished()

    def response_finished(self) -> None:
        """
        Close the connection or read the next request, once a response is written.
        """
        self._responding = False
        if self.transport is None:
            return
        if self._close_after:
            self.transport.close()
            return
        if self._buffer:
            self._parse()


def _date() -> bytes:
    return formatdate(usegmt=True).encode()


def _check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"upstream: --host {host} is not a loopback address")


async def serve(host: str, port: int) -> None:
    """
    Serve on host:port until SIGTERM or SIGINT.
    """
    loop = asyncio.get_running_loop()
    pacer = _Pacer(loop)
    server = await loop.create_server(
        lambda: _Connection(pacer), host, port, backlog=4096, reuse_address=True
    )
    stopped = loop.create_future()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopped.set_result, None)
    print(f"upstream listening on {host}:{port}", flush=True)
    await stopped
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address")
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    arguments = parser.parse_args()
    _check_loopback(arguments.host)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(arguments.host, arguments.port))
    else:
        uvloop.run(serve(arguments.host, arguments.port))


if __name__ == "__main__":
    main()
