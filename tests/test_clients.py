"""
Real clients through exoproxy: ollama-python and the openai SDK on the simulated
cloud, and each client's view of the errors that a proxy can produce.
"""

from __future__ import annotations

import json

import ollama
import openai
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread

from tests.daemon import free_port, simulated_arguments, start_daemon, wait_for_status
from tests.upstream import (
    Script,
    ScriptedUpstream,
    json_bytes,
    json_response,
    ndjson_lines,
)

MODEL = "granite3.1-dense:8b"


@pytest.fixture(scope="module")
def ready_daemon():
    """
    A daemon on the simulated cloud whose instance is ready, shared by the tests
    of this module that only read.
    """
    service, base_url = pytest_twisted.blockon(
        start_daemon(simulated_arguments(hold_timeout=60, idle_timeout=600))
    )
    client = ollama.Client(host=base_url)
    pytest_twisted.blockon(deferToThread(client.ps))
    pytest_twisted.blockon(deferToThread(client.show, MODEL))
    yield service, base_url
    pytest_twisted.blockon(service.stopService())


def openai_client(base_url: str) -> openai.OpenAI:
    # The SDK retries 5xx responses twice by default, and the tests check one.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest_twisted.inlineCallbacks
def test_ollama_embed(ready_daemon):
    _, base_url = ready_daemon
    client = ollama.Client(host=base_url)
    embedded = yield deferToThread(client.embed, model=MODEL, input=["a", "b"])
    assert len(embedded.embeddings) == 2
    assert all(len(vector) > 0 for vector in embedded.embeddings)

    legacy = yield deferToThread(client.embeddings, model=MODEL, prompt="a")
    assert len(legacy.embedding) > 0


@pytest_twisted.inlineCallbacks
def test_ollama_pull_progress(ready_daemon):
    _, base_url = ready_daemon
    client = ollama.Client(host=base_url)
    progress = yield deferToThread(
        lambda: [part.status for part in client.pull(MODEL, stream=True)]
    )
    assert len(progress) > 1
    assert progress[-1] == "success"

    final = yield deferToThread(client.pull, MODEL, stream=False)
    assert final.status == "success"


@pytest_twisted.inlineCallbacks
def test_ollama_show_and_list(ready_daemon):
    _, base_url = ready_daemon
    client = ollama.Client(host=base_url)
    shown = yield deferToThread(client.show, MODEL)
    assert shown.modelfile is not None or shown.details is not None
    listed = yield deferToThread(client.list)
    assert MODEL in [model.model for model in listed.models]


@pytest_twisted.inlineCallbacks
def test_openai_chat_plain_and_streamed(ready_daemon):
    _, base_url = ready_daemon
    client = openai_client(base_url)
    messages = [{"role": "user", "content": "hello"}]

    completion = yield deferToThread(
        client.chat.completions.create, model=MODEL, messages=messages
    )
    assert completion.choices[0].message.content

    def streamed():
        chunks = client.chat.completions.create(
            model=MODEL, messages=messages, stream=True
        )
        return [chunk.choices[0].delta.content for chunk in chunks if chunk.choices]

    pieces = yield deferToThread(streamed)
    assert len(pieces) > 1
    assert "".join(piece or "" for piece in pieces)


@pytest_twisted.inlineCallbacks
def test_openai_models_list(ready_daemon):
    _, base_url = ready_daemon
    client = openai_client(base_url)
    models = yield deferToThread(client.models.list)
    assert MODEL in [model.id for model in models.data]


@pytest_twisted.inlineCallbacks
def test_cold_503_as_clients_see_it():
    service, base_url = yield start_daemon(simulated_arguments())
    try:
        with pytest.raises(ollama.ResponseError) as ollama_error:
            yield deferToThread(
                ollama.Client(host=base_url).chat,
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
            )
        assert ollama_error.value.status_code == 503
        assert "GPU instance is starting" in ollama_error.value.error

        with pytest.raises(openai.APIStatusError) as openai_error:
            yield deferToThread(
                openai_client(base_url).chat.completions.create,
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
            )
        assert openai_error.value.status_code == 503
        assert "GPU instance is starting" in str(openai_error.value)
        yield wait_for_status(base_url, lambda s: s["provisioning_status"] == "ready")
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_backend_down_502_as_clients_see_it():
    arguments = [
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--backend-url",
        f"http://127.0.0.1:{free_port()}",
    ]
    service, base_url = yield start_daemon(arguments)
    try:
        with pytest.raises(ollama.ResponseError) as ollama_error:
            yield deferToThread(ollama.Client(host=base_url).generate, MODEL, "x")
        assert ollama_error.value.status_code == 502
        assert "cannot connect to the Ollama backend" in ollama_error.value.error

        with pytest.raises(openai.APIStatusError) as openai_error:
            yield deferToThread(
                openai_client(base_url).chat.completions.create,
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
            )
        assert openai_error.value.status_code == 502
    finally:
        yield service.stopService()


@pytest.fixture
def upstream():
    server = ScriptedUpstream(reactor, reactor)
    server.start()
    yield server
    pytest_twisted.blockon(ensureDeferred(server.stop()))


@pytest_twisted.inlineCallbacks
def test_backend_timeout_504_as_clients_see_it(upstream):
    upstream.route("POST", "/api/generate", Script().wait(5))
    upstream.route("POST", "/v1/chat/completions", Script().wait(5))
    service, base_url = yield start_daemon(
        [
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--backend-url",
            upstream.url,
            "--upstream-idle-timeout",
            "0.3",
        ]
    )
    try:
        with pytest.raises(ollama.ResponseError) as ollama_error:
            yield deferToThread(
                ollama.Client(host=base_url).generate, MODEL, "x", stream=False
            )
        assert ollama_error.value.status_code == 504

        with pytest.raises(openai.APIStatusError) as openai_error:
            yield deferToThread(
                openai_client(base_url).chat.completions.create,
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
            )
        assert openai_error.value.status_code == 504
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_error_line_mid_stream_as_ollama_sees_it(upstream):
    lines = ndjson_lines(3)[:2] + [json_bytes({"error": "CUDA out of memory"}) + b"\n"]
    script = Script().head(
        200,
        [("Content-Type", "application/x-ndjson"), ("Transfer-Encoding", "chunked")],
    )
    for line in lines:
        script.chunk(line, delay=0.05)
    upstream.route("POST", "/api/chat", script.end_chunks())
    upstream.route(
        "POST",
        "/api/show",
        json_response({"error": f"model '{MODEL}' not found"}, status=404),
    )
    service, base_url = yield start_daemon(
        ["--listen", "tcp:0:interface=127.0.0.1", "--backend-url", upstream.url]
    )
    try:
        client = ollama.Client(host=base_url)
        received: list[str] = []

        def chat():
            stream = client.chat(MODEL, [{"role": "user", "content": "x"}], stream=True)
            for part in stream:
                received.append(part.message.content)

        with pytest.raises(ollama.ResponseError) as error:
            yield deferToThread(chat)
        assert error.value.error == "CUDA out of memory"
        assert len(received) == 2

        with pytest.raises(ollama.ResponseError) as not_found:
            yield deferToThread(client.show, MODEL)
        assert not_found.value.status_code == 404
        assert not_found.value.error == f"model '{MODEL}' not found"
    finally:
        yield service.stopService()


def test_json_error_bodies_parse():
    # Every error body exoproxy writes is one JSON object with "error" first.
    from exoproxy.errors import error_body

    body = json.loads(error_body("x", provisioning=True, status="provisioning"))
    assert list(body) == ["error", "provisioning", "status"]
