"""
Start an exoproxy daemon in the test process, on loopback.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater

from exoproxy.tap import Options, makeService


def free_port() -> int:
    """
    Return a TCP port that is free on loopback now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def simulated_arguments(**overrides: Any) -> list[str]:
    """
    Return the options of a daemon on the simulated cloud with short delays.
    """
    settings = {
        "listen": "tcp:0:interface=127.0.0.1",
        "backend-port": str(free_port()),
        "simulate-boot-delay": "0.3",
        "poll-interval": "0.1",
        "idle-timeout": "3",
        "idle-check-interval": "0.1",
        "ready-timeout": "60",
        "api-timeout": "10",
    }
    settings.update(
        {key.replace("_", "-"): str(value) for key, value in overrides.items()}
    )
    arguments = ["--simulate"]
    for name, value in settings.items():
        arguments += [f"--{name}", value]
    return arguments


@inlineCallbacks
def start_daemon(arguments: list[str]):
    """
    Start a daemon with these options; return the service and its base URL.
    """
    options = Options(environ={})
    options.parseOptions(arguments)
    service = makeService(options)
    service.startService()
    ports = yield service.when_listening()
    return service, f"http://127.0.0.1:{ports[0].getHost().port}"


@inlineCallbacks
def get_json(url: str):
    """
    GET a URL and return its status code and parsed JSON body.
    """
    response = yield treq.get(url)
    body = yield treq.content(response)
    return response.code, json.loads(body)


@inlineCallbacks
def wait_for_status(base_url: str, predicate, timeout: float = 30.0):
    """
    Poll /status until C{predicate(status)} is true, and return the status seen
    at each change of provisioning_status.

    Raises:
        AssertionError: the predicate stayed false for C{timeout} seconds.
    """
    seen: list[dict[str, Any]] = []
    waited = 0.0
    while True:
        _, status = yield get_json(f"{base_url}/status")
        if not seen or seen[-1]["provisioning_status"] != status["provisioning_status"]:
            seen.append(status)
        if predicate(status):
            return seen
        if waited >= timeout:
            raise AssertionError(f"status never matched; last: {status}")
        yield deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
