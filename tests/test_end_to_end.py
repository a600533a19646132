"""
The daemon on the simulated cloud, driven by the official ollama client over real
loopback sockets: a cold start, streamed and plain calls, and the idle stop.
"""

from __future__ import annotations

import json

import ollama
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.daemon import get_json, simulated_arguments, start_daemon, wait_for_status

MODEL = "granite3.1-dense:8b"


def api_calls(service, operation: str | None = None) -> list:
    calls = service.simulator.cloud.calls
    if operation is None:
        return list(calls)
    return [call for call in calls if call.operation == operation]


@pytest.fixture
def daemon():
    started = pytest_twisted.blockon(start_daemon(simulated_arguments()))
    yield started
    pytest_twisted.blockon(started[0].stopService())


@pytest_twisted.inlineCallbacks
def test_cold_start_then_stream_then_idle_stop(daemon):
    service, base_url = daemon
    client = ollama.Client(host=base_url)

    with pytest.raises(ollama.ResponseError) as raised:
        yield deferToThread(client.generate, model=MODEL, prompt="hi")
    assert raised.value.status_code == 503
    assert "starting" in raised.value.error

    seen = yield wait_for_status(
        base_url, lambda status: status["provisioning_status"] == "ready"
    )
    assert [status["provisioning_status"] for status in seen] == [
        "provisioning",
        "ready",
    ]
    ready = seen[-1]
    assert ready["instance_status"] == "running"
    assert ready["remote_url"].startswith("https://127.0.0.")
    assert ready["simulated"] is True

    def stream_generate():
        return [part.response for part in client.generate(MODEL, "hi", stream=True)]

    pieces = yield deferToThread(stream_generate)
    assert len(pieces) > 1

    def stream_chat():
        messages = [{"role": "user", "content": "hello"}]
        return [
            part.message.content for part in client.chat(MODEL, messages, stream=True)
        ]

    chunks = yield deferToThread(stream_chat)
    assert len(chunks) > 1

    answer = yield deferToThread(
        client.generate, model=MODEL, prompt="hi", stream=False
    )
    assert answer.done
    assert answer.response

    listed = yield deferToThread(client.list)
    assert MODEL in [model.model for model in listed.models]

    stopped = yield wait_for_status(
        base_url,
        lambda status: status["instance_status"] == "stopped",
        timeout=30,
    )
    assert stopped[-1]["provisioning_status"] == "idle"
    assert len(api_calls(service, "stop-instance")) == 1


@pytest_twisted.inlineCallbacks
def test_concurrent_cold_requests_create_once(daemon):
    service, base_url = daemon
    body = b'{"model": "%s", "prompt": "hi", "stream": false}' % MODEL.encode()

    @inlineCallbacks
    def generate():
        response = yield treq.post(f"{base_url}/api/generate", data=body)
        payload = yield treq.content(response)
        return response.code, response.headers, payload

    answers = yield DeferredList([generate() for _ in range(40)], consumeErrors=True)
    for succeeded, (code, headers, payload) in answers:
        assert succeeded
        assert code == 503
        assert headers.getRawHeaders(b"retry-after")
        assert payload.startswith(b'{"error": ')
        assert b'"provisioning": true' in payload

    yield wait_for_status(base_url, lambda s: s["provisioning_status"] == "ready")
    assert len(api_calls(service, "create-instance")) == 1
    assert len(service.simulator.cloud.instances) == 1


@pytest_twisted.inlineCallbacks
def test_ready_requests_make_no_api_calls(daemon):
    service, base_url = daemon
    client = ollama.Client(host=base_url)
    yield get_json(f"{base_url}/api/ps")
    with pytest.raises(ollama.ResponseError):
        yield deferToThread(client.show, MODEL)
    yield wait_for_status(base_url, lambda s: s["provisioning_status"] == "ready")

    before = len(api_calls(service))

    def many_calls():
        for _ in range(20):
            client.show(MODEL)
            client.generate(MODEL, "x", stream=False)

    yield deferToThread(many_calls)
    for _ in range(20):
        yield get_json(f"{base_url}/status")
    assert len(api_calls(service)) == before


@pytest_twisted.inlineCallbacks
def test_request_while_stopping_restarts(daemon):
    service, base_url = daemon
    client = ollama.Client(host=base_url)
    with pytest.raises(ollama.ResponseError):
        yield deferToThread(client.generate, model=MODEL, prompt="hi")
    yield wait_for_status(base_url, lambda s: s["provisioning_status"] == "ready")
    yield wait_for_status(
        base_url, lambda s: s["provisioning_status"] == "stopping", timeout=30
    )

    with pytest.raises(ollama.ResponseError) as raised:
        yield deferToThread(client.generate, model=MODEL, prompt="hi")
    assert raised.value.status_code == 503

    seen = yield wait_for_status(
        base_url, lambda s: s["provisioning_status"] == "ready", timeout=30
    )
    assert [status["provisioning_status"] for status in seen][-2:] == [
        "provisioning",
        "ready",
    ]
    assert len(api_calls(service, "start-instance")) == 1
    assert len(api_calls(service, "create-instance")) == 1


@pytest_twisted.inlineCallbacks
def test_polling_routes_answer_cold(daemon):
    service, base_url = daemon
    code, tags = yield get_json(f"{base_url}/api/tags")
    assert code == 200
    assert [model["name"] for model in tags["models"]] == [MODEL]

    code, version = yield get_json(f"{base_url}/api/version")
    assert code == 200
    assert version["version"]

    code, running = yield get_json(f"{base_url}/api/ps")
    assert running == {"models": []}

    yield deferLater(reactor, 0.5, lambda: None)
    _, status = yield get_json(f"{base_url}/status")
    assert status["provisioning_status"] == "idle"
    assert api_calls(service) == []


@pytest_twisted.inlineCallbacks
def test_idle_destroy_then_new_instance():
    generate = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()
    service, base_url = yield start_daemon(simulated_arguments(idle_action="destroy"))
    try:
        yield treq.post(f"{base_url}/api/generate", data=generate)
        ready = yield wait_for_status(
            base_url, lambda s: s["provisioning_status"] == "ready"
        )
        first_id = ready[-1]["instance_id"]
        destroyed = yield wait_for_status(
            base_url, lambda s: s["instance_status"] == "destroyed", timeout=30
        )
        after_destroy = destroyed[-1]

        yield treq.post(f"{base_url}/api/generate", data=generate)
        again = yield wait_for_status(
            base_url, lambda s: s["provisioning_status"] == "ready"
        )
        second_id = again[-1]["instance_id"]
    finally:
        yield service.stopService()

    assert after_destroy["phase"] == "idle"
    assert after_destroy["instance_id"] is None
    assert after_destroy["next_action"] == (
        "bringing an instance up on the next request that needs the model"
    )
    assert second_id != first_id
    assert len(api_calls(service, "create-instance")) == 2
