"""
The simulated Ollama of a simulated instance, driven over loopback by the official
`ollama` client (in threads) and by treq and a raw TCP client for the framing.
"""

from __future__ import annotations

import json
import time

import ollama
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool

from exoproxy.simulator.pacing import PacedWriter

from .conftest import (
    TINY_TIMINGS,
    cloud_config,
    create_body,
    in_thread,
    running_simulator,
    sleep,
    wait_for,
)

MODEL = "llama3.2"


def boot_instance(cloud, user_data: str | None = None):
    """
    Create an instance whose Ollama listens on a free port and pulls MODEL.
    """
    body = create_body(cloud, **{"user-data": user_data or cloud_config(port=0)})
    operation = cloud.create_instance(body)
    return cloud.instances[operation["reference"]["id"]]


def base_url(instance) -> str:
    return f"http://{instance.public_ip}:{instance.ollama_port}"


@pytest.fixture
def http():
    from twisted.internet import reactor

    return HTTPClient(
        Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    )


@pytest_twisted.async_fixture
async def instance(simulator):
    booted = boot_instance(simulator.cloud)
    await wait_for(lambda: booted.store.find(MODEL))
    return booted


@pytest.fixture
def client(instance):
    official = ollama.Client(host=base_url(instance))
    yield official
    official.close()


class RawClient(Protocol):
    """
    A client that sends one raw HTTP request and records what arrives, and when.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.arrivals: list[float] = []
        self.first_body_chunk: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.arrivals.append(time.monotonic())
        if b'"done":false' in self.received and not self.first_body_chunk.called:
            self.first_body_chunk.callback(None)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


def raw_post(path: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: ollama\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )


async def connect_raw(instance, request: bytes) -> RawClient:
    from twisted.internet import reactor

    endpoint = TCP4ClientEndpoint(reactor, instance.public_ip, instance.ollama_port)
    return await connectProtocol(endpoint, RawClient(request))


def paced_timers() -> list:
    from twisted.internet import reactor

    return [
        call
        for call in reactor.getDelayedCalls()
        if isinstance(getattr(call.func, "__self__", None), PacedWriter)
    ]


@pytest_twisted.ensureDeferred
async def test_tags_list_model_after_pull(http):
    async with running_simulator(pull_delay=0.5) as service:
        booted = boot_instance(service.cloud)
        await wait_for(lambda: booted.ollama_port)
        response = await http.get(base_url(booted) + "/api/tags")
        assert await response.json() == {"models": []}

        await wait_for(lambda: booted.store.find(MODEL))
        response = await http.get(base_url(booted) + "/api/tags")
        [model] = (await response.json())["models"]

    assert model["name"] == "llama3.2:latest"
    assert model["model"] == "llama3.2:latest"
    assert model["size"] > 0
    assert len(model["digest"]) == 64
    assert model["details"]["format"] == "gguf"
    assert model["details"]["family"] == "llama"
    assert model["modified_at"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_root_and_version(instance, http):
    root = await http.get(base_url(instance) + "/")
    version = await http.get(base_url(instance) + "/api/version")
    head = await http.head(base_url(instance) + "/api/version")

    assert await root.text() == "Ollama is running"
    assert root.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert await version.json() == {"version": "0.5.7"}
    assert head.code == 200
    assert await head.content() == b""


@pytest_twisted.ensureDeferred
async def test_unknown_route_not_found(instance, http):
    response = await http.get(base_url(instance) + "/api/nothing")
    wrong_method = await http.get(base_url(instance) + "/api/generate")

    assert response.code == 404
    assert await response.text() == "404 page not found"
    assert wrong_method.code == 404


@pytest_twisted.ensureDeferred
async def test_generate_not_streamed(client):
    reply = await in_thread(
        client.generate, model=MODEL, prompt="hello there", stream=False
    )

    assert reply.done is True
    assert reply.done_reason == "stop"
    assert "simulated reply from llama3.2:latest" in reply.response
    assert reply.eval_count == len(reply.response.split(" "))
    assert reply.prompt_eval_count == 2
    assert reply.total_duration > 0


@pytest_twisted.ensureDeferred
async def test_generate_streamed(client):
    parts = await in_thread(
        lambda: list(client.generate(model=MODEL, prompt="hi", stream=True))
    )

    assert len(parts) > 2
    assert all(part.done is False for part in parts[:-1])
    assert parts[-1].done is True
    assert parts[-1].eval_count == len(parts) - 1
    text = "".join(part.response for part in parts)
    assert text.startswith("This is a simulated reply")


@pytest_twisted.ensureDeferred
async def test_generate_stream_framing(instance, http):
    arrivals = []
    response = await http.post(
        base_url(instance) + "/api/generate",
        json={"model": MODEL, "prompt": "hi"},
        unbuffered=True,
    )
    content_type = response.headers.getRawHeaders(b"content-type")
    await treq.collect(response, lambda data: arrivals.append((time.monotonic(), data)))

    body = b"".join(data for _, data in arrivals)
    lines = [json.loads(line) for line in body.splitlines()]
    assert content_type == [b"application/x-ndjson"]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["eval_count"] == len(lines) - 1
    assert lines[-1]["done_reason"] == "stop"
    assert len(arrivals) > 2
    spread = arrivals[-1][0] - arrivals[0][0]
    assert spread >= (len(lines) - 2) * TINY_TIMINGS.token_interval * 0.5


@pytest_twisted.ensureDeferred
async def test_generate_json_content_type(instance, http):
    response = await http.post(
        base_url(instance) + "/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False},
    )
    reply = await response.json()

    assert response.headers.getRawHeaders(b"content-type")[0].startswith(
        b"application/json"
    )
    assert reply["done"] is True
    assert reply["response"]


@pytest_twisted.ensureDeferred
async def test_generate_token_limit(client):
    reply = await in_thread(
        client.generate,
        model=MODEL,
        prompt="hi",
        stream=False,
        options={"num_predict": 3},
    )

    assert reply.eval_count == 3
    assert reply.done_reason == "length"


@pytest_twisted.ensureDeferred
async def test_empty_prompt_loads_model(instance, http):
    response = await http.post(
        base_url(instance) + "/api/generate", json={"model": MODEL}
    )
    reply = await response.json()

    assert response.headers.getRawHeaders(b"content-type")[0].startswith(
        b"application/json"
    )
    assert reply["done"] is True
    assert reply["done_reason"] == "load"
    assert reply["response"] == ""


@pytest_twisted.ensureDeferred
async def test_chat_streamed_and_not(client):
    messages = [{"role": "user", "content": "tell me something"}]

    parts = await in_thread(
        lambda: list(client.chat(model=MODEL, messages=messages, stream=True))
    )
    whole = await in_thread(client.chat, model=MODEL, messages=messages, stream=False)

    assert len(parts) > 2
    assert parts[-1].done is True
    streamed = "".join(part.message.content for part in parts)
    assert streamed == whole.message.content
    assert whole.message.role == "assistant"
    assert "prompt of 3 words" in whole.message.content


@pytest_twisted.ensureDeferred
async def test_unknown_model_not_found(client, instance, http):
    with pytest.raises(ollama.ResponseError) as raised:
        await in_thread(client.generate, model="nope", prompt="hi")
    response = await http.post(
        base_url(instance) + "/api/chat",
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )

    assert raised.value.status_code == 404
    assert raised.value.error == "model 'nope' not found"
    assert response.code == 404
    assert await response.json() == {"error": "model 'nope' not found"}


@pytest_twisted.ensureDeferred
async def test_malformed_json_rejected(instance, http):
    response = await http.post(base_url(instance) + "/api/generate", data=b"{oops")
    missing_model = await http.post(
        base_url(instance) + "/api/generate", json={"prompt": "x"}
    )

    assert response.code == 400
    assert "invalid JSON" in (await response.json())["error"]
    assert missing_model.code == 400
    assert await missing_model.json() == {"error": "model is required"}


@pytest_twisted.ensureDeferred
async def test_openai_chat_streamed(instance, http):
    response = await http.post(
        base_url(instance) + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        },
    )
    body = (await response.content()).decode()

    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    events = [block for block in body.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks)
    assert text.startswith("This is a simulated reply")


@pytest_twisted.ensureDeferred
async def test_openai_chat_not_streamed(instance, http):
    response = await http.post(
        base_url(instance) + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    reply = await response.json()
    unknown = await http.post(
        base_url(instance) + "/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
    )

    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] > 0
    assert unknown.code == 404
    assert (await unknown.json())["error"]["type"] == "not_found_error"


@pytest_twisted.ensureDeferred
async def test_pull_streamed_then_listed(client):
    statuses = await in_thread(
        lambda: [part.status for part in client.pull("mistral", stream=True)]
    )
    listed = await in_thread(client.list)

    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    assert any(status.startswith("pulling ") for status in statuses[1:-1])
    assert "mistral:latest" in [model.model for model in listed.models]


@pytest_twisted.ensureDeferred
async def test_pull_not_streamed(client, instance):
    reply = await in_thread(client.pull, "qwen2.5:7b", stream=False)

    assert reply.status == "success"
    assert instance.store.find("qwen2.5:7b") is not None


@pytest_twisted.ensureDeferred
async def test_show_and_ps(client):
    show_reply = await in_thread(client.show, MODEL)
    await in_thread(client.generate, model=MODEL, prompt="warm up", stream=False)
    running = await in_thread(client.ps)

    assert show_reply.details.family == "llama"
    assert "completion" in show_reply.capabilities
    assert [model.model for model in running.models] == ["llama3.2:latest"]
    with pytest.raises(ollama.ResponseError) as raised:
        await in_thread(client.show, "nope")
    assert raised.value.status_code == 404


@pytest_twisted.ensureDeferred
async def test_embeddings(client):
    embedded = await in_thread(client.embed, model=MODEL, input=["a", "b"])
    again = await in_thread(client.embed, model=MODEL, input="a")
    legacy = await in_thread(client.embeddings, model=MODEL, prompt="a")

    assert len(embedded.embeddings) == 2
    assert len(embedded.embeddings[0]) == 32
    assert again.embeddings[0] == embedded.embeddings[0]
    assert embedded.embeddings[0] != embedded.embeddings[1]
    assert list(legacy.embedding) == embedded.embeddings[0]


@pytest_twisted.ensureDeferred
async def test_blobs(client, instance, http, tmp_path):
    blob = tmp_path / "adapter.bin"
    blob.write_bytes(b"simulated weights")
    digest = "sha256:" + __import__("hashlib").sha256(b"simulated weights").hexdigest()
    url = base_url(instance) + f"/api/blobs/{digest}"

    unknown = await http.head(url)
    created = await in_thread(client.create_blob, blob)
    known = await http.head(url)
    other = "sha256:" + "0" * 64
    mismatch = await http.post(base_url(instance) + f"/api/blobs/{other}", data=b"x")
    malformed = await http.post(base_url(instance) + "/api/blobs/md5:abc", data=b"x")

    assert unknown.code == 404
    assert created == digest
    assert instance.store.blobs[digest] == b"simulated weights"
    assert known.code == 200
    assert mismatch.code == 400
    assert "digest mismatch" in (await mismatch.json())["error"]
    assert malformed.code == 400


@pytest_twisted.ensureDeferred
async def test_disconnect_stops_stream():
    async with running_simulator(token_interval=0.2) as service:
        booted = boot_instance(service.cloud)
        await wait_for(lambda: booted.store.find(MODEL))
        request = raw_post("/api/generate", {"model": MODEL, "prompt": "x"})
        raw = await connect_raw(booted, request)
        await raw.first_body_chunk
        assert b"Transfer-Encoding: chunked" in raw.received
        assert paced_timers()

        raw.transport.abortConnection()
        await raw.lost
        await sleep(0.01)

        assert paced_timers() == []


@pytest_twisted.ensureDeferred
async def test_stop_aborts_ollama():
    from twisted.internet import reactor

    async with running_simulator(token_interval=0.2) as service:
        booted = boot_instance(service.cloud)
        await wait_for(lambda: booted.store.find(MODEL))
        address, port = booted.public_ip, booted.ollama_port
        request = raw_post("/api/generate", {"model": MODEL, "prompt": "x"})
        raw = await connect_raw(booted, request)
        await raw.first_body_chunk

        service.cloud.stop_instance(booted.id)
        await raw.lost

        assert b'"done":true' not in raw.received
        assert paced_timers() == []
        endpoint = TCP4ClientEndpoint(reactor, address, port)
        with pytest.raises(ConnectionRefusedError):
            await connectProtocol(endpoint, Protocol())


@pytest_twisted.ensureDeferred
async def test_restart_keeps_models(simulator, instance, http):
    cloud = simulator.cloud
    first_pull = instance.store.find(MODEL)

    cloud.stop_instance(instance.id)
    await wait_for(lambda: instance.state.value == "stopped")
    assert instance.ollama_port is None
    cloud.start_instance(instance.id)
    await wait_for(lambda: instance.ollama_port)

    response = await http.get(base_url(instance) + "/api/tags")
    [model] = (await response.json())["models"]
    assert model["name"] == "llama3.2:latest"
    assert instance.store.find(MODEL) is first_pull


@pytest_twisted.ensureDeferred
async def test_no_ollama_without_drop_in(simulator):
    booted = boot_instance(simulator.cloud, cloud_config(port=None))
    await wait_for(lambda: booted.state.value == "running")
    await sleep(TINY_TIMINGS.boot_delay * 3)

    assert booted.boot.port is None
    assert booted.ollama_port is None
