"""
Measure what the kernel charges for one NDJSON line over loopback TCP, without any
HTTP or event loop framework: the floor under every target of the benchmark.

    python -m bench.sendcost --sockets 500 --rate 25000 --seconds 5

A sender process writes 150-byte lines round-robin to `--sockets` connections at
`--rate` lines/s, waking every 0.5 ms or so to write the lines that are due, and a
receiver process reads them with epoll. The two run on different CPUs when there
are two. Prints one JSON object with the CPU time per line of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import sys
import time

_LINE = b"x" * 149 + b"\n"
_TICK = 0.0005


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _receive(
    port: int, sockets: int, seconds: float, cpu: int | None, out: int
) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    connections = [
        socket.create_connection(("127.0.0.1", port)) for _ in range(sockets)
    ]
    selector = selectors.EpollSelector()
    for connection in connections:
        connection.setblocking(False)
        selector.register(connection, selectors.EVENT_READ)

    received = 0
    started = _cpu()
    deadline = time.monotonic() + seconds + 1.5
    while time.monotonic() < deadline:
        for key, _ in selector.select(0.1):
            try:
                received += len(key.fileobj.recv(65536))
            except BlockingIOError:
                pass
    os.write(out, json.dumps([received, _cpu() - started]).encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sendcost")
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--rate", type=float, default=25000, help="lines/s in all")
    parser.add_argument("--seconds", type=float, default=5)
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)

    cpus = sorted(os.sched_getaffinity(0))
    sender_cpu, receiver_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]

    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        _receive(port, arguments.sockets, arguments.seconds, receiver_cpu, write_end)
        os._exit(0)
    os.close(write_end)

    if sender_cpu is not None:
        os.sched_setaffinity(0, {sender_cpu})
    connections = [listener.accept()[0] for _ in range(arguments.sockets)]
    for connection in connections:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    time.sleep(0.5)

    sent = 0
    started_cpu = _cpu()
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < arguments.seconds:
        due = int(arguments.rate * elapsed)
        while sent < due:
            connections[sent % len(connections)].send(_LINE)
            sent += 1
        time.sleep(_TICK)
    sender_cpu_s = _cpu() - started_cpu
    elapsed = time.monotonic() - started

    received_bytes, receiver_cpu_s = json.loads(os.read(read_end, 4096))
    os.waitpid(child, 0)
    received = received_bytes // len(_LINE)
    print(
        json.dumps(
            {
                "sockets": arguments.sockets,
                "lines_sent": sent,
                "lines_per_s": sent / elapsed,
                "lines_received": received,
                "sender_cpu_us_per_line": sender_cpu_s * 1e6 / sent,
                "receiver_cpu_us_per_line": receiver_cpu_s * 1e6 / max(received, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
