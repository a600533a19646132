"""
Profile exoproxy's reactor thread under one benchmark load, with py-spy.

    python -m bench.profile streams --streams 200 --out bench/profiles/streams.md
    python -m bench.profile small --clients 1 --out bench/profiles/small.md

It starts the upstream and `twistd -n exoproxy --backend-url ...` pinned as in
`bench.run`, attaches `py-spy record` to exoproxy while the load generator runs, and
writes where the reactor thread spent its busy samples: by layer, by line and by
function. The figures of a profiled run are not benchmark figures, because py-spy
pauses exoproxy for each sample.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.processes import (
    Managed,
    exoproxy_command,
    free_port,
    pinned,
    plan_cpus,
    run_loadgen,
    start_upstream,
    wait_for_http,
)

# The reactor thread waits in epoll on this line; a sample there is idle time.
_IDLE_FRAME = "EPollReactor.doPoll (twisted/internet/epollreactor.py:227)"

# Functions in a larger share of the busy samples than this are the event loop.
_LOOP_SHARE = 0.9

# Layers by the path of the innermost frame, first match wins.
_LAYERS = (
    ("exoproxy", "exoproxy/"),
    ("twisted.web (HTTP parsing and framing)", "twisted/web/"),
    ("twisted.logger and log context", "twisted/logger/"),
    ("twisted.python (log context, failures)", "twisted/python/"),
    ("twisted.internet (reactor, TCP transports, Deferreds)", "twisted/internet/"),
    ("twisted.protocols (LineReceiver)", "twisted/protocols/"),
)


def _layer(frame: str) -> str:
    for name, path in _LAYERS:
        if path in frame:
            return name
    return "other (standard library, zope.interface, idna)"


def summarize(raw: Path, top: int) -> tuple[list[str], dict[str, float]]:
    """
    Summarize py-spy's raw (collapsed) output for the reactor thread, and return
    the Markdown lines and the busy share of each layer.
    """
    busy = 0
    idle = 0
    by_layer: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    for entry in raw.read_text().splitlines():
        stack, _, count_text = entry.rpartition(" ")
        if "ReactorBase.run" not in stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1] == _IDLE_FRAME:
            idle += count
            continue
        busy += count
        by_layer[_layer(frames[-1])] += count
        by_line[frames[-1]] += count
        for function in {frame.split(" (")[0] for frame in frames}:
            by_function[function] += count

    def share(count: int) -> str:
        return f"{100 * count / busy:.1f} %" if busy else "–"

    lines = [
        f"Reactor thread: {busy} busy samples and {idle} idle samples, so it was "
        f"busy {100 * busy / max(busy + idle, 1):.0f} % of the time.",
        "",
        "| layer of the innermost frame | share of busy samples |",
        "| --- | --- |",
    ]
    lines += [
        f"| {layer} | {share(count)} |" for layer, count in by_layer.most_common()
    ]
    lines += ["", "| innermost line (self time) | share |", "| --- | --- |"]
    lines += [
        f"| `{line}` | {share(count)} |" for line, count in by_line.most_common(top)
    ]
    # The reactor loop and twistd's frames are in nearly every sample, so the
    # function table leaves them out.
    lines += ["", "| function, with what it calls | share |", "| --- | --- |"]
    table_rows = [
        (function, count)
        for function, count in by_function.most_common()
        if busy and count / busy < _LOOP_SHARE
    ]
    lines += [
        f"| `{function}` | {share(count)} |" for function, count in table_rows[:40]
    ]
    layers = {layer: count / busy for layer, count in by_layer.items()} if busy else {}
    return lines + [""], layers


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--out", type=Path, required=True, help="Markdown to write")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output here")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    commands = parser.add_subparsers(dest="scenario", required=True)
    streams = commands.add_parser("streams", help="concurrent NDJSON streams")
    streams.add_argument("--streams", type=int, default=200)
    streams.add_argument("--rate-per-stream", type=float, default=50)
    streams.add_argument("--seconds", type=float, default=8)
    small = commands.add_parser("small", help="non-streamed /api/show requests")
    small.add_argument("--clients", type=int, default=1)
    small.add_argument("--seconds", type=float, default=6)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    py_spy = py_spy or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("bench.profile needs py-spy: pip install '.[bench]'")

    load_cpus, proxy_cpus = plan_cpus()
    workdir = Path(tempfile.mkdtemp(prefix="exoproxy-profile-"))
    raw = arguments.raw or workdir / "py-spy.txt"
    upstream, upstream_port = start_upstream(workdir, load_cpus)
    port = free_port()
    exoproxy = None
    try:
        wait_for_http(upstream_port, upstream)
        command = exoproxy_command(upstream_port, port, workdir / "exoproxy.twistd.log")
        exoproxy = Managed(
            "exoproxy",
            pinned(command, proxy_cpus),
            workdir / "exoproxy.out",
            cwd=workdir,
        )
        wait_for_http(port, exoproxy)

        if arguments.scenario == "streams":
            lines = round(arguments.rate_per_stream * arguments.seconds)
            load = ["streams", "--streams", str(arguments.streams)]
            load += ["--rate", str(arguments.rate_per_stream), "--lines", str(lines)]
            load += ["--ramp", "1"]
            duration = arguments.seconds + 3
        else:
            load = ["small", "--clients", str(arguments.clients)]
            load += ["--duration", str(arguments.seconds)]
            duration = arguments.seconds + 1
        recorder = subprocess.Popen(
            pinned(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(exoproxy.pid),
                    "--rate",
                    str(arguments.rate),
                    "--duration",
                    str(int(duration)),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                load_cpus,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = run_loadgen(port, load, load_cpus)
        recorder.wait(timeout=duration + 30)
    finally:
        if exoproxy is not None:
            exoproxy.stop()
        upstream.stop()

    summary, _ = summarize(raw, arguments.top)
    header = [
        f"# Profile of exoproxy: {arguments.scenario}",
        "",
        f"Command: `python -m bench.profile {' '.join(sys.argv[1:])}`",
        "",
        "Load generator result during the profile (py-spy pauses exoproxy for each "
        "sample, so these are not benchmark figures):",
        "",
        "```",
        str({key: value for key, value in result.items() if key != "errors"}),
        "```",
        "",
    ]
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text("\n".join(header + summary))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
