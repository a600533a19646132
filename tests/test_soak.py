"""
A bounded soak: several hundred mixed requests, with API faults injected at random
from a fixed seed, through a cold start, an idle stop, a start of the stopped
instance and a restart of the daemon that adopts it.

Every response must be well formed, at most one instance may ever be created, and
no instance may run once the last daemon has exited with --on-exit stop.
"""

from __future__ import annotations

import json
import random

import pytest_twisted
from twisted.internet.defer import DeferredList, inlineCallbacks

from tests.fault_daemon import (  # noqa: F401 (fixtures)
    MODEL,
    captured_log,
    daemons,
    request,
    wait_for_status,
    wait_until,
    zone,
)

SEED = 20240611
CONCURRENCY = 8

# The requests that clients send, with their weights.
REQUESTS = (
    (6, "POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
    (4, "POST", "/api/generate", {"model": MODEL, "prompt": "tell me more"}),
    (4, "POST", "/api/chat", {"model": MODEL, "messages": [{"role": "user"}]}),
    (2, "POST", "/api/embed", {"model": MODEL, "input": "text"}),
    (2, "POST", "/api/show", {"model": MODEL}),
    (3, "GET", "/api/tags", None),
    (2, "GET", "/api/version", None),
    (2, "GET", "/api/ps", None),
    (1, "GET", "/v1/models", None),
    (2, "GET", "/status", None),
    (1, "POST", "/api/generate", b'{"model": '),
    (1, "GET", "/api/nothing", None),
    (1, "DELETE", "/api/chat", None),
)

FAULTY_OPERATIONS = (
    "list-instances",
    "get-instance",
    "get-operation",
    "create-instance",
    "start-instance",
    "stop-instance",
    "list-templates",
    "list-instance-types",
    "list-security-groups",
    "create-security-group",
)

ANSWER_CODES = {200, 400, 404, 405, 502, 503, 504}


def arm_random_fault(faults, chooser: random.Random) -> None:
    operation = chooser.choice(FAULTY_OPERATIONS)
    choice = chooser.randrange(7)
    if choice == 0:
        faults.fail_calls(operation, "status", status=500)
    elif choice == 1:
        faults.fail_calls(operation, "status", status=503, after=True)
    elif choice == 2:
        faults.fail_calls(operation, "status", status=429, retry_after=0)
    elif choice == 3:
        faults.fail_calls(operation, "drop", after=chooser.random() < 0.5)
    elif choice == 4:
        faults.fail_calls(operation, "malformed", after=True)
    elif choice == 5 and operation in ("start-instance", "stop-instance"):
        faults.fail_operations(operation, reason=chooser.choice([None, "busy"]))
    else:
        faults.fail_calls(operation, "hang")


def check_answer(code: int, headers, body: bytes, path: str) -> None:
    assert code in ANSWER_CODES, (code, path, body[:200])
    content_type = (headers.getRawHeaders(b"content-type") or [b""])[0]
    if code != 200:
        assert content_type.startswith(b"application/json"), (code, path)
        assert isinstance(json.loads(body)["error"], str), (code, path)
        return
    if path == "/status" or content_type.startswith(b"application/json"):
        json.loads(body)
    else:
        for line in body.splitlines():
            json.loads(line)


class Soak:
    """
    Clients that send weighted random requests and check every response.
    """

    def __init__(self, zone, seed: int) -> None:
        self._zone = zone
        self._chooser = random.Random(seed)
        self.answers: dict[int, int] = {}
        self.sent = 0

    @inlineCallbacks
    def run(self, base_url: str, count: int, fault_every: int = 8):
        """
        Send C{count} requests from CONCURRENCY clients, arming a random API fault
        every C{fault_every} requests.
        """
        left = [count]

        @inlineCallbacks
        def client():
            while left[0] > 0:
                left[0] -= 1
                self.sent += 1
                if self.sent % fault_every == 0:
                    arm_random_fault(self._zone.cloud.faults, self._chooser)
                yield self._send(base_url)

        yield DeferredList(
            [client() for _ in range(CONCURRENCY)], fireOnOneErrback=True
        )

    @inlineCallbacks
    def _send(self, base_url: str):
        weights = [weight for weight, *_ in REQUESTS]
        _, method, path, body = self._chooser.choices(REQUESTS, weights)[0]
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        code, headers, content = yield request(method, f"{base_url}{path}", body)
        check_answer(code, headers, content, path)
        self.answers[code] = self.answers.get(code, 0) + 1


def state_is(name: str):
    return lambda status: status["provisioning_status"] == name


@inlineCallbacks
def demand_until_ready(base_url: str):
    """
    Send a request that needs the instance every 0.2 s until it is ready, as a
    client that retries after a 503 does.
    """
    body = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()

    @inlineCallbacks
    def ready():
        code, headers, content = yield request("POST", f"{base_url}/api/generate", body)
        check_answer(code, headers, content, "/api/generate")
        return code == 200

    yield wait_until(ready, 30, "the instance to serve")


@pytest_twisted.inlineCallbacks
def test_soak_with_random_faults(zone, daemons, captured_log):
    soak = Soak(zone, SEED)
    options = {
        "idle_timeout": "1",
        "api_timeout": "0.5",
        "ready_timeout": "15",
        "api_retries": "4",
    }

    # A cold start under load and faults, then served requests.
    first, base_url = yield daemons.start(on_exit="keep", **options)
    yield soak.run(base_url, 150, fault_every=3)
    yield demand_until_ready(base_url)
    yield soak.run(base_url, 100)

    # The idle stop, then a start of the stopped instance under faults.
    yield wait_for_status(
        base_url, lambda s: s["instance_status"] == "stopped", timeout=30
    )
    yield soak.run(base_url, 100, fault_every=3)
    yield demand_until_ready(base_url)

    # A restart of the daemon, which adopts the running instance.
    zone.cloud.faults.clear()
    yield daemons.stop(first)
    second, base_url = yield daemons.start(**options)
    yield soak.run(base_url, 150, fault_every=3)
    yield demand_until_ready(base_url)
    zone.cloud.faults.clear()
    yield daemons.stop(second)

    assert soak.sent == 500
    assert soak.answers.get(200, 0) > 50
    assert soak.answers.get(503, 0) > 0
    assert len(zone.cloud.faults.created_instances) == 1
    # Most armed faults wait for calls that never come, because a ready daemon
    # makes none; these are the ones that took effect.
    assert len(zone.cloud.faults.log) > 20
    yield wait_until(lambda: zone.running() == [], 5, "no instance to run")
    assert zone.states() == ["stopped"]
    assert captured_log.failures() == []
