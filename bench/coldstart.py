"""
Cold starts on the simulated cloud, with the daemon running in this process.

    python -m bench.coldstart --runs 3 --requests 1000

Each run starts a daemon as `twistd exoproxy --simulate` would, with its options
parsed by `exoproxy.tap`, and wakes it with one request. Every few milliseconds it
then checks whether the simulated Ollama's model store, which its `/api/tags` lists,
has the model, and polls the daemon's `/status`. Once the daemon is ready it sends
`--requests` requests through the ready daemon and counts the Exoscale API calls that
the simulator received meanwhile. Prints one JSON object on stdout.

The daemon detects the model only at its next readiness poll, so the lag between the
simulated Ollama listing the model and `/status` saying ready depends on where the
model's arrival falls in the poll cycle. The simulator's delays are fixed, so the
runs spread their simulated boot delay evenly over `--phase-spread` seconds, which
moves that point through the cycle.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from typing import Any

_MODEL = "granite3.1-dense:8b"

# The requests sent in the ready state, in turn: one that wakes the instance and
# three that only read from it.
_READY_REQUESTS = (
    ("POST", "/api/show", {"model": _MODEL}),
    ("GET", "/api/tags", None),
    ("GET", "/api/version", None),
    ("GET", "/api/ps", None),
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _daemon_arguments(arguments: argparse.Namespace, boot_delay: float) -> list[str]:
    options = [
        "--simulate",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--backend-port",
        str(_free_port()),
        "--simulate-boot-delay",
        f"{boot_delay:.3f}",
        "--model",
        _MODEL,
    ]
    if arguments.poll_interval is not None:
        options += ["--poll-interval", str(arguments.poll_interval)]
    return options


def _simulated_ollama_has_model(service: Any) -> bool:
    # The simulated instance may serve Ollama behind TLS and a bearer token, so
    # its state is read in-process instead of through its /api/tags.
    return any(
        instance.ollama_port is not None and instance.store.find(_MODEL) is not None
        for instance in service.simulator.cloud.instances.values()
    )


async def _get_json(treq: Any, pool: Any, url: str) -> tuple[int, Any]:
    response = await treq.get(url, pool=pool, timeout=5)
    body = await treq.content(response)
    try:
        return response.code, json.loads(body)
    except ValueError:
        return response.code, None


async def _one_run(
    reactor: Any, arguments: argparse.Namespace, boot_delay: float
) -> dict[str, Any]:
    import treq
    from twisted.internet.task import deferLater
    from twisted.web.client import HTTPConnectionPool

    from exoproxy.tap import Options, makeService

    options = Options(environ={})
    options.parseOptions(_daemon_arguments(arguments, boot_delay))
    service = makeService(options)
    service.startService()
    pool = HTTPConnectionPool(reactor, persistent=True)
    try:
        ports = await service.when_listening()
        base_url = f"http://127.0.0.1:{ports[0].getHost().port}"

        woken_at = time.monotonic()
        response = await treq.post(
            f"{base_url}/api/show", json={"model": _MODEL}, pool=pool, timeout=5
        )
        await treq.content(response)
        first_status = response.code

        # The first check that found the model comes at most one probe interval
        # and one /status request after the model's arrival, so the lag measured
        # from it can be short by that much.
        ollama_ready_at = None
        status_ready_at = None
        while status_ready_at is None:
            if time.monotonic() - woken_at > arguments.timeout:
                raise RuntimeError(
                    f"the daemon was not ready within {arguments.timeout:g} s"
                )
            if ollama_ready_at is None and _simulated_ollama_has_model(service):
                ollama_ready_at = time.monotonic()
            _, status = await _get_json(treq, pool, f"{base_url}/status")
            if status["provisioning_status"] == "ready":
                status_ready_at = time.monotonic()
            else:
                await deferLater(reactor, arguments.probe_interval, lambda: None)

        if ollama_ready_at is None:
            raise RuntimeError(
                "/status reported ready before the simulated Ollama listed the model"
            )

        calls_before = len(service.simulator.cloud.calls)
        statuses: Counter[int] = Counter()
        for index in range(arguments.requests):
            method, path, body = _READY_REQUESTS[index % len(_READY_REQUESTS)]
            response = await treq.request(
                method, f"{base_url}{path}", json=body, pool=pool, timeout=5
            )
            await treq.content(response)
            statuses[response.code] += 1
        calls_after = len(service.simulator.cloud.calls)
    finally:
        await pool.closeCachedConnections()
        await service.stopService()

    return {
        "boot_delay_s": boot_delay,
        "first_status": first_status,
        "cold_start_s": status_ready_at - woken_at,
        "ollama_ready_to_status_ready_s": status_ready_at - ollama_ready_at,
        "api_calls_during_cold_start": calls_before,
        "ready_requests": arguments.requests,
        "ready_request_statuses": {
            str(code): count for code, count in statuses.items()
        },
        "api_calls_in_ready_state": calls_after - calls_before,
    }


async def _all_runs(reactor: Any, arguments: argparse.Namespace) -> None:
    step = arguments.phase_spread / arguments.runs
    runs = []
    for index in range(arguments.runs):
        boot_delay = arguments.boot_delay + index * step
        runs.append(await _one_run(reactor, arguments, boot_delay))
    lags = [run["ollama_ready_to_status_ready_s"] for run in runs]
    result = {
        "runs": runs,
        "poll_interval_s": arguments.poll_interval,
        "lag_mean_s": sum(lags) / len(lags),
        "lag_max_s": max(lags),
        "api_calls_in_ready_state": sum(
            run["api_calls_in_ready_state"] for run in runs
        ),
        "ready_requests": sum(run["ready_requests"] for run in runs),
    }
    json.dump(result, sys.stdout)
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.coldstart")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        help="the daemon's --poll-interval in seconds [default: the daemon's own]",
    )
    parser.add_argument(
        "--boot-delay",
        type=float,
        default=0.3,
        help="simulated boot of the first run, in seconds",
    )
    parser.add_argument(
        "--phase-spread",
        type=float,
        default=1.0,
        help="seconds over which the runs spread their simulated boot delay",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=0.005,
        help="seconds between two checks of the simulated Ollama and /status",
    )
    parser.add_argument("--timeout", type=float, default=60, help="seconds")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(_all_runs(reactor, arguments)))


if __name__ == "__main__":
    main()
