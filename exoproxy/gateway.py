"""
The HTTP front of exoproxy, which serves what it can locally and proxies the rest.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from exoproxy.activity import ActivityTracker
from exoproxy.auth import ClientTokens
from exoproxy.catalog import BackendCatalog
from exoproxy.cors import CorsPolicy
from exoproxy.errors import send_error
from exoproxy.lifecycle_interfaces import Backend, ShuttingDown
from exoproxy.metrics import DaemonMetrics
from exoproxy.proxy import ProxiedExchange
from exoproxy.routes import (
    DEFAULT_LOCAL_ROUTES,
    MethodNotAllowed,
    RouteNotFound,
    match_route,
)
from exoproxy.status_page import prefers_html, render_status_page

log = Logger()

HEARTBEAT = b"Ollama is running"

# The largest JSON request body, once decompressed, that exoproxy accepts. It bounds
# the memory that one gzip-compressed body can take.
MAX_DECODED_JSON_BODY = 256 * 1024 * 1024


class BackendSource:
    """
    The destination of proxied requests: a managed instance or a fixed backend.
    """

    # Whether the backend goes away when idle, so that a polling request that fails
    # to reach it gets the local answer instead of a 502.
    stops_when_idle = False

    def current_backend(self) -> Backend | None:
        raise NotImplementedError

    def demand(self) -> None:
        raise NotImplementedError

    def wait_until_ready(self) -> Deferred[Backend]:
        """
        Return a Deferred that fires with the backend once it is ready, or fails
        with the reason when bringing it up fails. Cancelling it stops the wait.
        """
        raise NotImplementedError

    def unavailable(self) -> tuple[str, dict[str, Any], int]:
        """
        Return the message, the extra JSON fields and the Retry-After seconds of the
        503 for a request that arrives while no backend is ready. The extra fields
        include "provisioning", which is true while a cold start is under way.
        """
        raise NotImplementedError


class _BadBody(ValueError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _decoded_body(request: Request) -> bytes:
    """
    Return the request body, decompressed when its Content-Encoding is gzip or
    deflate.
    """
    request.content.seek(0)
    raw = request.content.read()
    encoding = (request.getHeader(b"content-encoding") or b"identity").lower()
    if encoding in (b"identity", b""):
        return raw
    if encoding not in (b"gzip", b"deflate", b"x-gzip"):
        raise _BadBody(415, f"unsupported Content-Encoding {encoding.decode()!r}")

    # wbits 47 accepts both gzip and zlib headers.
    decompressor = zlib.decompressobj(47)
    try:
        decoded = decompressor.decompress(raw, MAX_DECODED_JSON_BODY + 1)
    except zlib.error as error:
        raise _BadBody(400, f"invalid {encoding.decode()} request body: {error}")
    if len(decoded) > MAX_DECODED_JSON_BODY or decompressor.unconsumed_tail:
        raise _BadBody(413, "the decompressed request body is too large")
    return decoded


def _check_json_object(body: bytes) -> None:
    if not body.strip():
        raise _BadBody(400, "missing request body")
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise _BadBody(400, f"invalid JSON in request body: {error}") from None
    if not isinstance(parsed, dict):
        raise _BadBody(400, "the request body must be a JSON object")


class Gateway(Resource):
    """
    The root resource: every request, whatever its path, comes here.
    """

    isLeaf = True

    def __init__(
        self,
        *,
        source: BackendSource,
        activity: ActivityTracker,
        catalog: BackendCatalog,
        agent: IAgent,
        clock: IReactorTime,
        status: Callable[[], dict[str, Any]],
        cors: CorsPolicy,
        upstream_idle_timeout: float,
        local_routes: frozenset[str] = DEFAULT_LOCAL_ROUTES,
        hold_timeout: float = 0,
        max_held_requests: int = 0,
        metrics: DaemonMetrics | None = None,
        serves_metrics: bool = False,
        client_tokens: ClientTokens | None = None,
        on_backend_failure: Callable[[str, str], None] = lambda url, reason: None,
    ) -> None:
        """
        Args:
            local_routes: the paths that are answered locally while no backend is
                ready, and that never count as activity.
            hold_timeout: seconds that a request waits for a cold start before it
                gets a 503; 0 answers 503 at once.
            max_held_requests: how many requests may wait at once; the ones past it
                get a 503 at once.
            metrics: the daemon's metrics, which count the bytes relayed.
            serves_metrics: whether `/metrics` is served here; without it the path
                gets 404, as when the metrics have their own listener.
            client_tokens: the bearer tokens that every request except `GET /`,
                `HEAD /` and CORS preflights must carry; None accepts any client.
            on_backend_failure: called with the backend's URL and the reason when
                a request cannot connect to the backend or the backend breaks off
                a response.
        """
        super().__init__()
        self._source = source
        self._activity = activity
        self._catalog = catalog
        self._agent = agent
        self._clock = clock
        self._status = status
        self._cors = cors
        self._upstream_idle_timeout = upstream_idle_timeout
        self._local_routes = local_routes
        self._hold_timeout = hold_timeout
        self._max_held_requests = max_held_requests
        self._metrics = metrics
        self._serves_metrics = serves_metrics and metrics is not None
        self._client_tokens = client_tokens
        self._on_backend_failure = on_backend_failure
        self.held_requests = 0

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode("utf-8", "replace")
        if not request.uri.startswith(b"/"):
            send_error(request, 400, "the request target must be a path")
            return NOT_DONE_YET

        origin = request.getHeader(b"origin")
        if origin is not None:
            if not self._cors.allows(origin.decode("utf-8", "replace")):
                send_error(request, 403, "origin not allowed")
                return NOT_DONE_YET
            if self._cors.is_preflight(request):
                return self._cors.answer_preflight(request, origin)
            self._cors.add_headers(request, origin)

        if not self._authenticated(request, path):
            send_error(
                request,
                401,
                "unauthorized: missing or invalid API key; send it as "
                "Authorization: Bearer TOKEN, or set OLLAMA_API_KEY for the ollama "
                "clients",
                headers={b"www-authenticate": b'Bearer realm="exoproxy"'},
            )
            return NOT_DONE_YET

        if path == "/":
            return self._render_heartbeat(request)
        if path == "/status":
            return self._render_status(request)
        if path == "/metrics" and self._serves_metrics:
            return self._render_metrics(request)

        try:
            route = match_route(request.method, path)
        except RouteNotFound:
            send_error(request, 404, f"404 page not found: {path}")
            return NOT_DONE_YET
        except MethodNotAllowed as error:
            allowed = b", ".join(sorted(error.allowed | {b"OPTIONS"}))
            send_error(
                request,
                405,
                f"method {request.method.decode('ascii', 'replace')} is not allowed "
                f"for {path}",
                headers={b"allow": allowed},
            )
            return NOT_DONE_YET

        # A JSON body is read whole to check it, so that a malformed request is
        # answered without waking the instance; the bytes sent upstream are the
        # client's, decompressed at most. Blob uploads stream instead.
        body = None
        if route.json_body:
            try:
                body = _decoded_body(request)
                _check_json_object(body)
            except _BadBody as error:
                send_error(request, error.code, str(error))
                return NOT_DONE_YET

        wakes = path not in self._local_routes
        backend = self._source.current_backend()
        if backend is None and not wakes:
            return self._render_cold(request, path)
        if backend is None:
            self._source.demand()
            backend = self._source.current_backend()
        if backend is not None:
            self._forward(request, wakes, backend, body)
        elif self._hold_timeout <= 0:
            self._render_unavailable(request)
        elif self.held_requests >= self._max_held_requests:
            log.warn(
                "{held} requests already wait for the instance "
                "(--max-held-requests); answering {method} {path} with 503",
                held=self.held_requests,
                method=request.method.decode("ascii", "replace"),
                path=path,
            )
            self._render_unavailable(request)
        else:
            self._hold(request, path, backend_body=body)
        return NOT_DONE_YET

    def _authenticated(self, request: Request, path: str) -> bool:
        # The heartbeat stays open, because clients and health checks probe it
        # before they send anything else.
        if self._client_tokens is None:
            return True
        if path == "/" and request.method in (b"GET", b"HEAD"):
            return True
        if self._client_tokens.accepts(request):
            return True
        self._client_tokens.record_rejection(request, path)
        return False

    def _hold(self, request: Request, path: str, backend_body: bytes | None) -> None:
        """
        Make a request wait for the cold start, up to the hold timeout, and then
        proxy it or answer 503.
        """
        self.held_requests += 1
        request.held = True
        waiter = self._source.wait_until_ready()
        waiter.addTimeout(self._hold_timeout, self._clock)
        client_gone = False

        def release(result: Any) -> Any:
            self.held_requests -= 1
            return result

        def ready(backend: Backend) -> None:
            if not client_gone:
                self._forward(request, True, backend, backend_body)

        def failed(failure: Failure) -> None:
            if client_gone:
                return
            if failure.check(ShuttingDown):
                send_error(
                    request,
                    503,
                    "exoproxy is shutting down",
                    headers={b"retry-after": b"10"},
                )
                return
            if failure.check(TimeoutError):
                log.info(
                    "{method} {path} waited {timeout} s for the instance "
                    "(--hold-timeout); answering 503",
                    method=request.method.decode("ascii", "replace"),
                    path=path,
                    timeout=self._hold_timeout,
                )
            self._render_unavailable(request)

        def disconnected(failure: Failure) -> None:
            nonlocal client_gone
            if waiter.called:
                return
            client_gone = True
            log.info(
                "The client of held request {method} {path} went away",
                method=request.method.decode("ascii", "replace"),
                path=path,
            )
            waiter.cancel()

        waiter.addBoth(release)
        waiter.addCallbacks(ready, failed)
        request.notifyFinish().addErrback(disconnected)

    def _render_heartbeat(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            send_error(
                request,
                405,
                "method not allowed for /",
                headers={b"allow": b"GET, HEAD"},
            )
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return HEARTBEAT

    def _render_status(self, request: Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            send_error(
                request,
                405,
                "method not allowed for /status",
                headers={b"allow": b"GET, HEAD"},
            )
            return NOT_DONE_YET
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"vary", b"Accept")
        if prefers_html(request):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return render_status_page(self._status())
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps(self._status(), indent=2).encode("utf-8") + b"\n"

    def _render_metrics(self, request: Request) -> bytes | int:
        """
        Render the Prometheus metrics; this never wakes the instance and is not
        activity.
        """
        if request.method not in (b"GET", b"HEAD"):
            send_error(
                request,
                405,
                "method not allowed for /metrics",
                headers={b"allow": b"GET, HEAD"},
            )
            return NOT_DONE_YET
        return self._metrics.resource.render(request)

    def _render_cold(self, request: Request, path: str) -> bytes:
        """
        Serve a polling route from what the backend last reported, without waking it.
        """
        if path == "/api/version":
            answer: dict[str, Any] = {"version": self._catalog.version}
        elif path == "/api/tags":
            answer = self._catalog.tags()
        elif path == "/v1/models":
            answer = self._catalog.openai_models()
        else:
            answer = {"models": []}
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps(answer).encode("utf-8")

    def _render_unavailable(self, request: Request) -> None:
        message, extra, retry_after = self._source.unavailable()
        cold_start = b"true" if extra.get("provisioning") else b"false"
        send_error(
            request,
            503,
            message,
            headers={
                b"retry-after": str(retry_after).encode("ascii"),
                b"x-exoproxy-cold-start": cold_start,
            },
            **extra,
        )

    def _forward(
        self, request: Request, wakes: bool, backend: Backend, body: bytes | None
    ) -> None:
        if wakes:
            self._activity.request_started()
            on_end = self._activity.request_finished
        else:

            def on_end() -> None:
                pass

        def count_and_end() -> None:
            if self._metrics is not None:
                self._metrics.upstream_bytes.inc(exchange.bytes_relayed)
            on_end()

        fallback = None
        if self._source.stops_when_idle and not wakes:

            def fallback() -> None:
                self._answer_cold(request)

        exchange = ProxiedExchange(
            request,
            agent=self._agent,
            clock=self._clock,
            backend_url=backend.url,
            idle_timeout=self._upstream_idle_timeout,
            on_end=count_and_end,
            body=body,
            on_backend_failure=lambda reason: self._on_backend_failure(
                backend.url, reason
            ),
            fallback=fallback,
        )
        exchange.start()

    def _answer_cold(self, request: Request) -> None:
        # A polling request that was proxied just before an idle stop closed the
        # backend gets the local answer rather than a 502.
        if request.finished or request._disconnected:
            return
        request.setResponseCode(200)
        request.write(self._render_cold(request, request.path.decode("utf-8")))
        request.finish()
