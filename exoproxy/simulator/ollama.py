"""
An Ollama-compatible HTTP API for one simulated instance.

The routes, status codes and JSON fields follow Ollama's REST API (docs/api.md of the
Ollama repository, version 0.5). Errors of the native API are `{"error": "..."}`, and
errors of the OpenAI-compatible `/v1` routes use the OpenAI error object. An unknown
route or method gets `404 page not found` as plain text, as Ollama's router sends.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from typing import Any, Callable, Generator

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from exoproxy.simulator.generation import (
    Completion,
    chat_steps,
    generate_steps,
    openai_chat_steps,
    reply_tokens,
)
from exoproxy.simulator.models import ModelRecord, ModelStore, format_timestamp
from exoproxy.simulator.ollama_http import (
    EVENT_STREAM,
    JSON,
    NDJSON,
    TEXT,
    OllamaError,
    parse_keep_alive,
    parse_max_tokens,
    read_json,
    respond,
    respond_json,
    respond_openai_error,
)
from exoproxy.simulator.pacing import PacedStep, PacedWriter

log = Logger()

OLLAMA_VERSION = "0.5.7"


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9._-]+)?$")
_BLOB_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_EMBEDDING_DIMENSIONS = 32
_PULL_PROGRESS_STEPS = 4


def _embedding(model: str, text: str) -> list[float]:
    """
    Derive a unit-length vector from a hash of the model and the text.
    """
    digest = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    digest += hashlib.sha256(digest).digest()
    raw = struct.unpack(f"<{_EMBEDDING_DIMENSIONS}b", digest[:_EMBEDDING_DIMENSIONS])
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be a JSON object")
    return options


class OllamaResource(Resource):
    """
    The root resource of one simulated Ollama server.

    Args:
        clock: The clock for token pacing, pull progress and timestamps.
        store: The instance's disk, which `/api/pull` and blob uploads change.
        token_interval: The seconds between two streamed tokens.
        pull_delay: The seconds that `/api/pull` takes.
        instance_id: The id of the instance, for the log.
    """

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        store: ModelStore,
        *,
        token_interval: float,
        pull_delay: float,
        instance_id: str = "",
    ) -> None:
        super().__init__()
        self._instance_id = instance_id
        self._clock = clock
        self._store = store
        self._token_interval = token_interval
        self._pull_delay = pull_delay
        # Loaded models by name, with the clock time at which each unloads.
        self._loaded: dict[str, float] = {}
        # The instance's injected faults (an InstanceFaults of
        # exoproxy.simulator.faults), whose crash_stream_after makes a stream
        # call on_crash after that many chunks; the instance sets both.
        self.faults: Any = None
        self.on_crash: Callable[[], None] = lambda: None
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], bytes | int]] = {
            (b"GET", b"/"): self._render_root,
            (b"GET", b"/api/version"): self._render_version,
            (b"GET", b"/api/tags"): self._render_tags,
            (b"GET", b"/api/ps"): self._render_ps,
            (b"POST", b"/api/show"): self._render_show,
            (b"POST", b"/api/generate"): self._render_generate,
            (b"POST", b"/api/chat"): self._render_chat,
            (b"POST", b"/api/embed"): self._render_embed,
            (b"POST", b"/api/embeddings"): self._render_embeddings,
            (b"POST", b"/api/pull"): self._render_pull,
            (b"GET", b"/v1/models"): self._render_openai_models,
            (b"POST", b"/v1/chat/completions"): self._render_openai_chat,
        }

    def render(self, request: Request) -> bytes | int:
        method = b"GET" if request.method == b"HEAD" else request.method
        if request.path.startswith(b"/api/blobs/"):
            handler = self._render_blob
        else:
            handler = self._routes.get((method, request.path))
        if handler is None:
            return respond(request, 404, TEXT, b"404 page not found")

        try:
            return handler(request)
        except OllamaError as error:
            return respond_json(request, error.status, {"error": error.message})

    def _model(self, body: dict[str, Any]) -> ModelRecord:
        name = body.get("model") or body.get("name")
        if not name or not isinstance(name, str):
            raise OllamaError(400, "model is required")

        record = self._store.find(name)
        if record is None:
            raise OllamaError(404, f"model '{name}' not found")
        return record

    def _load(self, record: ModelRecord, keep_alive: Any) -> None:
        seconds = parse_keep_alive(keep_alive)
        if seconds == 0:
            self._loaded.pop(record.name, None)
        else:
            self._loaded[record.name] = self._clock.seconds() + seconds

    def _stream(
        self,
        request: Request,
        content_type: bytes,
        steps: Generator[PacedStep, None, None],
        interval: float,
    ) -> int:
        request.setHeader(b"content-type", content_type)
        crash_after = getattr(self.faults, "crash_stream_after", None)
        if crash_after is not None:
            steps = self._crashing(steps, crash_after)
        PacedWriter(self._clock, request, steps, interval).start()
        return NOT_DONE_YET

    def _crashing(
        self, steps: Generator[PacedStep, None, None], chunks: int
    ) -> Generator[PacedStep, None, None]:
        """
        Pass on `chunks` chunks of `steps`, then crash the server and wait, so that
        the response ends only with its broken connection.
        """
        written = 0
        for step in steps:
            if step is not None:
                if written == chunks:
                    self.on_crash()
                    break
                written += 1
            yield step
        else:
            return
        while True:
            yield None

    def _render_root(self, request: Request) -> bytes:
        return respond(request, 200, TEXT, b"Ollama is running")

    def _render_version(self, request: Request) -> bytes:
        return respond_json(request, 200, {"version": OLLAMA_VERSION})

    def _render_tags(self, request: Request) -> bytes:
        models = [record.tags_entry() for record in self._store.models.values()]
        return respond_json(request, 200, {"models": models})

    def _render_ps(self, request: Request) -> bytes:
        now = self._clock.seconds()
        running = []
        for name, expires_at in list(self._loaded.items()):
            record = self._store.find(name)
            if record is None or expires_at <= now:
                del self._loaded[name]
                continue
            running.append(
                {
                    "name": record.name,
                    "model": record.name,
                    "size": record.size,
                    "digest": record.digest,
                    "details": record.details(),
                    "expires_at": format_timestamp(expires_at),
                    "size_vram": record.size,
                }
            )
        return respond_json(request, 200, {"models": running})

    def _render_show(self, request: Request) -> bytes:
        record = self._model(read_json(request))
        capabilities = ["embedding"] if record.is_embedding_model else ["completion"]
        return respond_json(
            request,
            200,
            {
                "license": "",
                "modelfile": f"# Simulated Modelfile\nFROM {record.name}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": record.details(),
                "model_info": {
                    "general.architecture": record.family,
                    "general.file_type": 15,
                },
                "capabilities": capabilities,
                "modified_at": format_timestamp(record.modified_at),
            },
        )

    def _completion(
        self, record: ModelRecord, model: str, prompt: str, limit: Any
    ) -> Completion:
        max_tokens = parse_max_tokens(limit)
        all_tokens = reply_tokens(record.name, prompt, None)
        tokens = reply_tokens(record.name, prompt, max_tokens)
        return Completion(
            model=model,
            prompt=prompt,
            tokens=tokens,
            truncated=len(tokens) < len(all_tokens),
            started_at=self._clock.seconds(),
            token_interval=self._token_interval,
        )

    def _load_reply(
        self, request: Request, model: str, keep_alive: Any, extra: dict[str, Any]
    ) -> bytes:
        """
        Reply to a request without a prompt, which only loads or unloads the model.
        """
        unloading = parse_keep_alive(keep_alive) == 0
        return respond_json(
            request,
            200,
            {
                "model": model,
                "created_at": format_timestamp(self._clock.seconds()),
                **extra,
                "done_reason": "unload" if unloading else "load",
                "done": True,
            },
        )

    def _render_generate(self, request: Request) -> bytes | int:
        body = read_json(request)
        record = self._model(body)
        model = body.get("model") or body.get("name")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")
        options = _options(body)

        self._load(record, body.get("keep_alive"))
        if not prompt:
            extra = {"response": ""}
            return self._load_reply(request, model, body.get("keep_alive"), extra)

        completion = self._completion(record, model, prompt, options.get("num_predict"))
        stream = body.get("stream") is not False
        steps = generate_steps(completion, stream)
        content_type = NDJSON if stream else JSON
        return self._stream(request, content_type, steps, self._token_interval)

    def _render_chat(self, request: Request) -> bytes | int:
        body = read_json(request)
        record = self._model(body)
        model = body.get("model")
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(
            isinstance(message, dict) for message in messages
        ):
            raise OllamaError(400, "messages must be a list of message objects")
        options = _options(body)

        self._load(record, body.get("keep_alive"))
        if not messages:
            extra = {"message": {"role": "assistant", "content": ""}}
            return self._load_reply(request, model, body.get("keep_alive"), extra)

        user_messages = [m for m in messages if m.get("role") == "user"]
        prompt = str(user_messages[-1].get("content", "")) if user_messages else ""
        completion = self._completion(record, model, prompt, options.get("num_predict"))
        stream = body.get("stream") is not False
        steps = chat_steps(completion, stream)
        content_type = NDJSON if stream else JSON
        return self._stream(request, content_type, steps, self._token_interval)

    def _render_embed(self, request: Request) -> bytes:
        body = read_json(request)
        record = self._model(body)
        inputs = body.get("input")
        if inputs is None:
            inputs = []
        elif isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise OllamaError(400, "invalid input type: expected a string or strings")

        self._load(record, body.get("keep_alive"))
        embeddings = [_embedding(record.name, text) for text in inputs]
        return respond_json(
            request,
            200,
            {
                "model": body.get("model"),
                "embeddings": embeddings,
                "total_duration": 14_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": sum(len(text.split()) for text in inputs),
            },
        )

    def _render_embeddings(self, request: Request) -> bytes:
        body = read_json(request)
        record = self._model(body)
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")

        self._load(record, body.get("keep_alive"))
        embedding = _embedding(record.name, prompt) if prompt else []
        return respond_json(request, 200, {"embedding": embedding})

    def _render_pull(self, request: Request) -> bytes | int:
        body = read_json(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            raise OllamaError(400, "invalid model name")

        stream = body.get("stream") is not False
        steps = self._pull_steps(name, stream)
        content_type = NDJSON if stream else JSON
        interval = self._pull_delay / _PULL_PROGRESS_STEPS
        return self._stream(request, content_type, steps, interval)

    def _pull_steps(self, name: str, stream: bool) -> Generator[PacedStep, None, None]:
        """
        Produce the progress lines of a pull, adding the model once all are sent.
        """
        record = ModelRecord.for_name(name, self._clock.seconds())
        layer = f"sha256:{record.digest}"

        def line(payload: dict[str, Any]) -> bytes:
            return json.dumps(payload).encode() + b"\n"

        if stream:
            yield line({"status": "pulling manifest"})
        for step in range(1, _PULL_PROGRESS_STEPS + 1):
            yield None
            if stream:
                progress = {
                    "status": f"pulling {record.digest[:12]}",
                    "digest": layer,
                    "total": record.size,
                    "completed": record.size * step // _PULL_PROGRESS_STEPS,
                }
                yield line(progress)

        if stream:
            yield line({"status": "verifying sha256 digest"})
            yield line({"status": "writing manifest"})
        self._store.add(name, self._clock.seconds())
        log.info(
            "Simulated Ollama of instance {instance_id} pulled model {model}",
            instance_id=self._instance_id,
            model=record.name,
        )
        yield line({"status": "success"})

    def _render_blob(self, request: Request) -> bytes:
        digest = request.path.removeprefix(b"/api/blobs/").decode("ascii", "replace")
        if not _BLOB_DIGEST.match(digest):
            raise OllamaError(400, f"invalid digest format {digest!r}")

        if request.method == b"HEAD":
            status = 200 if digest in self._store.blobs else 404
            return respond(request, status, TEXT, b"")
        if request.method != b"POST":
            return respond(request, 404, TEXT, b"404 page not found")
        if digest in self._store.blobs:
            return respond(request, 200, TEXT, b"")

        data = request.content.read()
        actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if actual != digest:
            raise OllamaError(
                400, f"digest mismatch, expected {digest!r}, got {actual!r}"
            )
        self._store.blobs[digest] = data
        return respond(request, 201, TEXT, b"")

    def _render_openai_models(self, request: Request) -> bytes:
        models = [
            {
                "id": record.name,
                "object": "model",
                "created": int(record.modified_at),
                "owned_by": "library",
            }
            for record in self._store.models.values()
        ]
        return respond_json(request, 200, {"object": "list", "data": models})

    def _render_openai_chat(self, request: Request) -> bytes | int:
        try:
            body = read_json(request)
            record = self._model(body)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise OllamaError(400, "messages must be a non-empty list")
            limit = body.get("max_completion_tokens", body.get("max_tokens"))
            user_messages = [
                m for m in messages if isinstance(m, dict) and m.get("role") == "user"
            ]
            content = user_messages[-1].get("content", "") if user_messages else ""
            completion = self._completion(record, body["model"], str(content), limit)
        except OllamaError as error:
            return respond_openai_error(request, error)

        stream = body.get("stream") is True
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(
            stream_options.get("include_usage")
        )
        steps = openai_chat_steps(completion, stream, include_usage)
        content_type = EVENT_STREAM if stream else JSON
        return self._stream(request, content_type, steps, self._token_interval)
