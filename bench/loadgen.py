"""
The benchmark's load generator, run as its own process for each measurement.

    python -m bench.loadgen streams --port P --streams 500 --rate 50 --lines 500
    python -m bench.loadgen small --port P --clients 50 --duration 5
    python -m bench.loadgen upload --port P --size 1073741824

Each command prints one JSON object on stdout. The target is always on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import sys
import time
from array import array
from typing import Any

from bench.client import RequestClient, StreamClient
from bench.stats import summarize_ns

_UPLOAD_BLOCK = 1024 * 1024


def _chat_request(host: str, port: int, lines: int, rate: float) -> bytes:
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "stream": True,
            "options": {"num_predict": lines},
            "bench_rate": rate,
        }
    ).encode()
    return (
        b"POST /api/chat HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body)
    )


def _show_request(host: str, port: int) -> bytes:
    body = b'{"model":"bench"}'
    return (
        b"POST /api/show HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port, len(body), body)
    )


async def run_streams(
    host: str,
    port: int,
    streams: int,
    rate: float,
    lines: int,
    ramp: float,
    settle: float,
    timeout: float,
) -> dict[str, Any]:
    """
    Open `streams` concurrent `/api/chat` streams of `lines` lines at `rate` lines/s
    each, and return the lines delivered and their delays.

    The streams start evenly spread over `ramp` seconds, or over one line interval
    when `ramp` is 0. Besides the delay of every line, the result has the delay in
    the steady state, when every stream is open and no connection is being set up.
    The steady state covers the lines sent from `settle` seconds after the last
    stream's first line until the first stream's last line. When no line falls in
    it, the steady delay is the delay of every line.
    """
    loop = asyncio.get_running_loop()
    request = _chat_request(host, port, lines, rate)
    delays = array("q")
    stamps = array("q")
    spread = ramp
    if spread <= 0 and rate > 0:
        spread = 1.0 / rate
    started = time.monotonic_ns()

    async def one_stream(index: int) -> StreamClient | str:
        await asyncio.sleep(spread * index / streams)
        finished = loop.create_future()
        try:
            await loop.create_connection(
                lambda: StreamClient(request, delays, stamps, finished), host, port
            )
        except OSError as error:
            return f"connect failed: {error}"
        return await finished

    tasks = [asyncio.ensure_future(one_stream(index)) for index in range(streams)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()

    errors: list[str] = []
    clients: list[StreamClient] = []
    for task in done:
        result = task.result()
        if isinstance(result, str):
            errors.append(result)
            continue
        clients.append(result)
        if result.error is not None:
            errors.append(result.error)
    if pending:
        errors.append(f"{len(pending)} streams did not end within {timeout:g} s")

    first_reads = [c.first_read_ns for c in clients if c.first_read_ns is not None]
    last_reads = [c.last_read_ns for c in clients if c.last_read_ns is not None]
    last_stamps = [c.last_stamp_ns for c in clients if c.last_stamp_ns is not None]
    steady = list(delays)
    steady_rate = None
    if first_reads and last_stamps:
        window_start = max(first_reads) + int(settle * 1e9)
        window_end = min(last_stamps)
        in_window = [
            delay
            for delay, stamp in zip(delays, stamps)
            if window_start <= stamp <= window_end
        ]
        if in_window:
            steady = in_window
            # Lines read in the window, whenever they were sent: the rate at
            # which the target delivered while every stream was open.
            read = sum(
                1
                for delay, stamp in zip(delays, stamps)
                if window_start <= stamp + delay <= window_end
            )
            steady_rate = read / ((window_end - window_start) / 1e9)

    elapsed_ns = max(last_reads) - min(first_reads) if first_reads else 0
    delivered = len(delays)
    return {
        "mode": "streams",
        "streams": streams,
        "rate": rate,
        "ramp_s": spread,
        "lines_per_stream": lines + 1,
        "expected_lines": streams * (lines + 1),
        "delivered_lines": delivered,
        "complete_streams": sum(1 for c in clients if c.error is None),
        "errors": sorted(set(errors))[:5],
        "error_count": len(errors),
        "delay_all": summarize_ns(delays),
        "delay": summarize_ns(steady),
        "wall_s": (time.monotonic_ns() - started) / 1e9,
        "lines_per_s": delivered / (elapsed_ns / 1e9) if elapsed_ns else None,
        "steady_lines_per_s": steady_rate,
    }


async def run_small(
    host: str, port: int, clients: int, rate: float, duration: float, warmup: int
) -> dict[str, Any]:
    """
    Run `clients` keep-alive clients that each send `/api/show` requests for
    `duration` seconds, one at a time, and return the latency of each request.

    With `rate` 0 each client sends its next request as soon as the previous
    response has arrived. Otherwise each client sends `rate` requests/s on a fixed
    schedule. When a response arrives after the next request's scheduled time,
    that request's latency counts from its scheduled time, so that a slow target
    cannot hide the requests it delayed. The first `warmup` requests of each client
    are not counted in the latencies.
    """
    loop = asyncio.get_running_loop()
    request = _show_request(host, port)
    latencies = array("q")
    sent_counts: list[int] = []
    errors: list[str] = []
    interval_ns = int(1e9 / rate) if rate > 0 else 0
    deadline = time.monotonic() + duration

    async def one_client(index: int) -> None:
        try:
            transport, protocol = await loop.create_connection(
                RequestClient, host, port
            )
        except OSError as error:
            errors.append(f"connect failed: {error}")
            return
        scheduled = time.monotonic_ns() + interval_ns * index // clients
        sent = 0
        try:
            while sent < warmup or time.monotonic() < deadline:
                start = time.monotonic_ns()
                if interval_ns:
                    if scheduled > start:
                        await asyncio.sleep((scheduled - start) / 1e9)
                        # The sleep may end late; that lateness is the load
                        # generator's, so the latency counts from the real send.
                        start = time.monotonic_ns()
                    else:
                        # The previous response came after this request's slot.
                        start = scheduled
                    scheduled += interval_ns
                status = await protocol.send(request)
                end = time.monotonic_ns()
                if status != 200:
                    errors.append(f"status {status}")
                    return
                if sent >= warmup:
                    latencies.append(end - start)
                sent += 1
        except (ConnectionError, ValueError) as error:
            errors.append(str(error))
        finally:
            transport.close()
            sent_counts.append(sent)

    started = time.monotonic()
    await asyncio.gather(*(one_client(index) for index in range(clients)))
    elapsed = time.monotonic() - started
    return {
        "mode": "small",
        "clients": clients,
        "rate_per_client": rate,
        "requests": len(latencies),
        "requests_per_s": sum(sent_counts) / elapsed if elapsed else None,
        "errors": sorted(set(errors))[:5],
        "error_count": len(errors),
        "latency": summarize_ns(latencies),
    }


async def run_upload(host: str, port: int, size: int) -> dict[str, Any]:
    """
    Upload `size` bytes to `/api/blobs/sha256:<digest>` with Content-Length, and
    return the status and the throughput.
    """
    block = bytes(range(256)) * (_UPLOAD_BLOCK // 256)
    blocks, rest = divmod(size, _UPLOAD_BLOCK)
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(block)
    digest.update(block[:rest])

    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(
        b"POST /api/blobs/sha256:%s HTTP/1.1\r\nHost: %s:%d\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
        % (digest.hexdigest().encode(), host.encode(), port, size)
    )
    for _ in range(blocks):
        writer.write(block)
        await writer.drain()
    writer.write(block[:rest])
    await writer.drain()

    head = await reader.readuntil(b"\r\n\r\n")
    elapsed = time.monotonic() - started
    writer.close()
    status = int(head.split(b" ", 2)[1])
    return {
        "mode": "upload",
        "bytes": size,
        "status": status,
        "seconds": elapsed,
        "mib_per_s": size / elapsed / 2**20 if elapsed else None,
    }


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address")
    parser.add_argument("--port", type=int, required=True)
    commands = parser.add_subparsers(dest="command", required=True)

    streams = commands.add_parser("streams", help="concurrent NDJSON streams")
    streams.add_argument("--streams", type=int, required=True)
    streams.add_argument("--rate", type=float, default=50, help="lines/s per stream")
    streams.add_argument("--lines", type=int, required=True, help="lines per stream")
    streams.add_argument(
        "--ramp",
        type=float,
        default=0,
        help="seconds over which the streams start [default: one line interval]",
    )
    streams.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds after the last stream's first line before the steady state",
    )
    streams.add_argument("--timeout", type=float, default=120, help="seconds")

    small = commands.add_parser("small", help="non-streamed /api/show requests")
    small.add_argument("--clients", type=int, required=True)
    small.add_argument(
        "--rate", type=float, default=0, help="requests/s per client; 0: back-to-back"
    )
    small.add_argument("--duration", type=float, required=True, help="seconds")
    small.add_argument("--warmup", type=int, default=20, help="requests per client")

    upload = commands.add_parser("upload", help="one blob upload")
    upload.add_argument("--size", type=int, required=True, help="bytes")
    return parser.parse_args(argv)


async def _main(arguments: argparse.Namespace) -> dict[str, Any]:
    if arguments.command == "streams":
        return await run_streams(
            arguments.host,
            arguments.port,
            arguments.streams,
            arguments.rate,
            arguments.lines,
            arguments.ramp,
            arguments.settle,
            arguments.timeout,
        )
    if arguments.command == "small":
        return await run_small(
            arguments.host,
            arguments.port,
            arguments.clients,
            arguments.rate,
            arguments.duration,
            arguments.warmup,
        )
    return await run_upload(arguments.host, arguments.port, arguments.size)


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    if not ipaddress.ip_address(arguments.host).is_loopback:
        raise SystemExit(f"loadgen: --host {arguments.host} is not a loopback address")
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_main(arguments))
    else:
        result = uvloop.run(_main(arguments))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
