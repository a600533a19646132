"""
No secret reaches the log or /status: not the instance's bearer secret or private
key, and not the tokens that clients send, accepted or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from exoproxy.backend_tls import generate_material
from tests.daemon import simulated_arguments, start_daemon

MODEL = "granite3.1-dense:8b"
TOKEN = "logscan-token-" + "q" * 24
REJECTED_TOKEN = "logscan-guess-" + "r" * 24


@pytest.fixture
def captured():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def event_text(event: dict) -> str:
    """
    Return everything that an observer could write for an event: the formatted
    message, and the repr of every field, which JSON and text logs build on.
    """
    fields = {key: value for key, value in event.items() if key != "log_logger"}
    return f"{formatEvent(event)}\n{fields!r}"


@inlineCallbacks
def wait_until_ready(base_url: str, headers: dict[str, str]):
    for _ in range(600):
        response = yield treq.get(f"{base_url}/status", headers=headers)
        status = yield treq.json_content(response)
        if status["provisioning_status"] == "ready":
            return status
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the instance never became ready")


class _Silent(Protocol):
    pass


@pytest_twisted.inlineCallbacks
def test_no_secret_in_logs_or_status(captured, tmp_path: Path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"{TOKEN}\n")
    service, base_url = yield start_daemon(simulated_arguments(api_key_file=keys))
    good = {"Authorization": f"Bearer {TOKEN}"}
    try:
        # Rejected clients, with and without a token.
        for headers in ({}, {"Authorization": f"Bearer {REJECTED_TOKEN}"}):
            response = yield treq.get(f"{base_url}/api/tags", headers=headers)
            yield treq.content(response)

        # A cold start, then streamed and plain requests with the ollama client.
        response = yield treq.post(
            f"{base_url}/api/show", json={"model": MODEL}, headers=good
        )
        yield treq.content(response)
        yield wait_until_ready(base_url, good)
        monkeypatch.setenv("OLLAMA_API_KEY", TOKEN)
        client = ollama.Client(host=base_url)

        def use():
            list(client.generate(MODEL, "hi", stream=True))
            client.chat(MODEL, [{"role": "user", "content": "hi"}], stream=False)
            client.list()

        yield deferToThread(use)
        material = service.backend_tls.pinned_material()
        response = yield treq.get(f"{base_url}/status", headers=good)
        status_text = yield treq.text_content(response)

        # A backend with another certificate, rejected and logged.
        instance = next(iter(service.simulator.cloud.instances.values()))
        address, port = instance.public_ip, instance.ollama_port
        yield instance.close()
        yield service._pool.closeCachedConnections()
        impostor = generate_material(reactor.seconds())
        pair = PrivateCertificate.loadPEM(
            impostor.certificate_pem + impostor.private_key_pem
        )
        endpoint = SSL4ServerEndpoint(reactor, port, pair.options(), interface=address)
        listening = yield endpoint.listen(Factory.forProtocol(_Silent))
        try:
            response = yield treq.post(
                f"{base_url}/api/generate",
                json={"model": MODEL, "prompt": "hi"},
                headers=good,
            )
            yield treq.content(response)
        finally:
            yield listening.stopListening()
        assert response.code == 502
        config_repr = repr(service.config)
    finally:
        yield service.stopService()

    key_body = "".join(material.private_key_pem.splitlines()[1:-1])
    secrets = {
        "instance bearer secret": material.bearer_token,
        "instance private key": key_body[:40],
        "client token": TOKEN,
        "rejected client token": REJECTED_TOKEN,
    }
    lines = [event_text(event) for event in captured]
    assert len(lines) > 30
    assert any("Rejected the backend" in line for line in lines)
    assert any("no valid API key" in line for line in lines)
    for name, secret in secrets.items():
        assert not [line for line in lines if secret in line], name
        assert secret not in status_text, name
        assert secret not in config_repr, name
    assert json.loads(status_text)["backend_tls"]["certificate_sha256"]
