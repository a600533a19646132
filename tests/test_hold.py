"""
Requests held through a cold start, and polling routes that never wake the
instance, on the simulated cloud.
"""

from __future__ import annotations

import json

import ollama
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from tests.daemon import get_json, simulated_arguments, start_daemon, wait_for_status

MODEL = "granite3.1-dense:8b"
GENERATE = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def captured_log():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def messages(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


@pytest_twisted.inlineCallbacks
def test_held_client_gets_answer_without_retry():
    service, base_url = yield start_daemon(simulated_arguments(hold_timeout=600))
    try:
        client = ollama.Client(host=base_url)
        answer = yield deferToThread(
            client.generate, model=MODEL, prompt="hi", stream=False
        )
        assert answer.done
        assert answer.response

        parts = yield deferToThread(
            lambda: list(
                client.chat(MODEL, [{"role": "user", "content": "x"}], stream=True)
            )
        )
        assert parts[-1].done
        generates = [
            call
            for call in service.simulator.cloud.calls
            if call.operation == "create-instance"
        ]
        assert len(generates) == 1
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_held_requests_share_one_cold_start():
    service, base_url = yield start_daemon(simulated_arguments(hold_timeout=600))
    try:
        responses = yield DeferredList(
            [treq.post(f"{base_url}/api/generate", data=GENERATE) for _ in range(20)],
            consumeErrors=True,
        )
        for succeeded, response in responses:
            assert succeeded
            assert response.code == 200
            body = json.loads((yield treq.content(response)))
            assert body["done"] is True
        assert len(service.simulator.cloud.instances) == 1
        assert service.gateway.held_requests == 0
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_hold_timeout_gives_503():
    service, base_url = yield start_daemon(
        simulated_arguments(hold_timeout=0.3, simulate_boot_delay=3)
    )
    try:
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        body = json.loads((yield treq.content(response)))
        assert response.code == 503
        assert list(body)[0] == "error"
        assert body["provisioning"] is True
        assert response.headers.getRawHeaders(b"x-exoproxy-cold-start") == [b"true"]
        assert int(response.headers.getRawHeaders(b"retry-after")[0]) > 0
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_held_cap_answers_503_at_once(captured_log):
    service, base_url = yield start_daemon(
        simulated_arguments(
            hold_timeout=600, max_held_requests=2, simulate_boot_delay=2
        )
    )
    try:
        held = [treq.post(f"{base_url}/api/generate", data=GENERATE) for _ in range(2)]
        yield sleep(0.3)
        assert service.gateway.held_requests == 2

        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        assert response.code == 503
        yield treq.content(response)
        assert any("--max-held-requests" in line for line in messages(captured_log))

        for waiting in held:
            answer = yield waiting
            assert answer.code == 200
            yield treq.content(answer)
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_held_client_disconnect_leaves_wait(captured_log):
    service, base_url = yield start_daemon(
        simulated_arguments(hold_timeout=600, simulate_boot_delay=2)
    )
    try:
        waiting = treq.post(f"{base_url}/api/generate", data=GENERATE)
        yield sleep(0.3)
        assert service.gateway.held_requests == 1
        assert service.lifecycle.waiting == 1

        waiting.cancel()
        with pytest.raises(Exception):
            yield waiting
        yield sleep(0.3)
        assert service.gateway.held_requests == 0
        assert service.lifecycle.waiting == 0
        assert any("went away" in line for line in messages(captured_log))
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_503_without_hold_has_cold_start_header():
    service, base_url = yield start_daemon(simulated_arguments())
    try:
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        yield treq.content(response)
        assert response.code == 503
        assert response.headers.getRawHeaders(b"x-exoproxy-cold-start") == [b"true"]
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_polling_never_starts_stopped_instance():
    service, base_url = yield start_daemon(simulated_arguments(idle_timeout=1))
    try:
        for _ in range(12):
            for path in ("/api/tags", "/api/version", "/api/ps", "/v1/models"):
                code, _ = yield get_json(base_url + path)
                assert code == 200
            yield sleep(0.1)
        assert service.simulator.cloud.calls == []
        _, status = yield get_json(f"{base_url}/status")
        assert status["provisioning_status"] == "idle"
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_polling_does_not_keep_instance_up():
    service, base_url = yield start_daemon(simulated_arguments(idle_timeout=1))
    try:
        client = ollama.Client(host=base_url)
        with pytest.raises(ollama.ResponseError):
            yield deferToThread(client.generate, model=MODEL, prompt="hi")
        yield wait_for_status(base_url, lambda s: s["provisioning_status"] == "ready")

        code, tags = yield get_json(f"{base_url}/api/tags")
        assert code == 200
        assert MODEL in [model["name"] for model in tags["models"]]

        stopped = False
        for _ in range(60):
            for path in ("/api/tags", "/api/version", "/api/ps"):
                code, _ = yield get_json(base_url + path)
                assert code == 200
            _, status = yield get_json(f"{base_url}/status")
            if status["instance_status"] == "stopped":
                stopped = True
                break
            yield sleep(0.1)
        assert stopped
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_local_routes_can_be_changed():
    service, base_url = yield start_daemon(
        simulated_arguments(local_routes="/api/version")
    )
    try:
        code, _ = yield get_json(f"{base_url}/api/version")
        assert code == 200
        code, body = yield get_json(f"{base_url}/api/tags")
        assert code == 503
        assert body["provisioning"] is True
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_held_request_gets_503_when_start_fails():
    # The API rejects the create call, so the run fails there, as it would for
    # a quota that the account has used up.
    service, base_url = yield start_daemon(simulated_arguments(hold_timeout=30))
    service.simulator.cloud.faults.fail_calls(
        "create-instance", "status", status=400, count=10
    )
    try:
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        body = json.loads((yield treq.content(response)))
        assert response.code == 503
        assert body["provisioning"] is False
        assert "create-instance failed: HTTP 400" in body["error"]
        assert response.headers.getRawHeaders(b"x-exoproxy-cold-start") == [b"false"]
        assert service.gateway.held_requests == 0

        # In the error state, before the backoff has passed, a held request waits
        # out the hold timeout and then gets the same 503.
        service.gateway._hold_timeout = 0.2
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        body = json.loads((yield treq.content(response)))
        assert response.code == 503
        assert body["status"] == "error"
    finally:
        yield service.stopService()
