"""
The benchmark harness: its HTTP response parser, and a short run of the whole
harness on the direct and exoproxy targets, so that `python -m bench.run` keeps
working. The run checks what the harness measured, not how fast it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.client import ProtocolError, ResponseParser
from bench.report import BEGIN, END
from bench.stats import summarize_ns

REPOSITORY = Path(__file__).resolve().parent.parent

_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b'6\r\n{"a":1\r\n2\r\n}\n\r\n0\r\n\r\n'
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!"
)


def _parse(pieces: list[bytes]) -> tuple[bytes, list[int]]:
    body: list[bytes] = []
    statuses: list[int] = []
    parser = ResponseParser(body.append, statuses.append)
    for piece in pieces:
        parser.feed(piece)
    return b"".join(body), statuses


def test_parser_whole_responses() -> None:
    body, statuses = _parse([_CHUNKED])

    assert body == b'{"a":1}\nno!'
    assert statuses == [200, 404]


def test_parser_split_anywhere() -> None:
    for split in range(1, len(_CHUNKED)):
        body, statuses = _parse([_CHUNKED[:split], _CHUNKED[split:]])

        assert body == b'{"a":1}\nno!', split
        assert statuses == [200, 404], split


def test_parser_rejects_bad_chunk_size() -> None:
    parser = ResponseParser(lambda data: None, lambda status: None)

    with pytest.raises(ProtocolError):
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


def test_percentiles_nearest_rank() -> None:
    summary = summarize_ns([i * 1_000_000 for i in range(1, 101)])

    assert summary["count"] == 100
    assert summary["p50_ms"] == 50
    assert summary["p99_ms"] == 99
    assert summary["max_ms"] == 100


def test_percentiles_empty() -> None:
    summary = summarize_ns([])

    assert summary["count"] == 0
    assert summary["p50_ms"] is None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """
    Run `python -m bench.run --quick` on direct and exoproxy, and return its raw
    results and its Markdown report.
    """
    directory = tmp_path_factory.mktemp("bench")
    report = directory / "benchmarks.md"
    raw = directory / "results.json"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--configs",
            "direct,exoproxy",
            "--out",
            str(report),
            "--json",
            str(raw),
        ],
        cwd=REPOSITORY,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr.decode(errors="replace")[-3000:]
    return json.loads(raw.read_text()), report.read_text()


def test_quick_run_delivers_every_line(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run

    assert results["streams"]
    for streams, by_target in results["streams"].items():
        for name in ("direct", "exoproxy"):
            result = by_target[name]
            assert result["errors"] == [], (streams, name)
            assert result["delivered_lines"] == result["expected_lines"], (
                streams,
                name,
            )
            assert result["delay"]["p50_ms"] > 0, (streams, name)


def test_quick_run_measures_exoproxy(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run
    largest = str(max(results["settings"]["concurrencies"]))

    assert results["streams"][largest]["exoproxy"]["proxy_cpu_s"] >= 0
    assert results["memory"]["exoproxy"]["idle"] > 0
    assert results["memory"]["exoproxy"]["streams"] > 0
    for name in ("direct", "exoproxy"):
        assert results["saturation"][name]["steps"], name
        assert results["upload"][name]["status"] == 201, name


def test_quick_run_small_requests(quick_run: tuple[dict, str]) -> None:
    results, _ = quick_run

    for case, by_target in results["small"].items():
        for name in ("direct", "exoproxy"):
            assert by_target[name]["errors"] == [], (case, name)
            assert by_target[name]["requests"] > 0, (case, name)


def test_quick_run_cold_start(quick_run: tuple[dict, str]) -> None:
    coldstart = quick_run[0]["coldstart"]

    assert coldstart["api_calls_in_ready_state"] == 0
    for run in coldstart["runs"]:
        assert run["first_status"] == 503
        assert run["ready_request_statuses"] == {"200": run["ready_requests"]}
        assert run["ollama_ready_to_status_ready_s"] >= 0


def test_quick_run_report(quick_run: tuple[dict, str]) -> None:
    _, report = quick_run

    assert BEGIN in report
    assert END in report
    assert "| 1 | lines delivered |" in report
    assert "### Cold start on the simulated cloud" in report
