"""
Relaying one HTTP request to the Ollama backend and its response back, byte for
byte, as the bytes arrive.

`twisted.web.proxy.ReverseProxyResource` is not used because it speaks HTTP/1.0 to
the upstream and has no backpressure.
"""

from __future__ import annotations

from io import BytesIO
from typing import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    FileBodyProducer,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from twisted.web.server import Request

from exoproxy.backend_agent import describe_tls_error, find_tls_error
from exoproxy.errors import send_error

log = Logger()

# Hop-by-hop headers (RFC 9110, section 7.6.1) apply to one connection, so they are
# never relayed; neither are the headers that a Connection header names.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request headers that exoproxy answers for itself or that must not reach the
# backend: Host is set for the backend (Ollama answers 403 to unknown host names),
# the client's Authorization is for exoproxy (ollama-python sends OLLAMA_API_KEY to
# any host), and CORS is handled before the request gets here. Content-Length is
# recomputed from the body that is sent.
_REQUEST_HEADERS_NOT_FORWARDED = HOP_BY_HOP_HEADERS | {
    b"host",
    b"authorization",
    b"origin",
    b"content-length",
    b"expect",
}

# Response headers that exoproxy sets itself.
_RESPONSE_HEADERS_NOT_RELAYED = HOP_BY_HOP_HEADERS | {
    b"content-length",
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-allow-headers",
    b"access-control-allow-methods",
    b"access-control-expose-headers",
    b"access-control-max-age",
}

_STREAM_CONTENT_TYPES = (b"application/x-ndjson", b"text/event-stream")


def _connection_listed(headers: Headers) -> set[bytes]:
    listed = set()
    for value in headers.getRawHeaders(b"connection", []):
        listed.update(token.strip().lower() for token in value.split(b","))
    return listed


def forwarded_headers(client_headers: Headers) -> Headers:
    """
    Return the request headers to send to the backend.
    """
    dropped = _REQUEST_HEADERS_NOT_FORWARDED | _connection_listed(client_headers)
    headers = Headers()
    for name, values in client_headers.getAllRawHeaders():
        if name.lower() not in dropped:
            headers.setRawHeaders(name, values)
    return headers


def relay_response_headers(response: IResponse, request: Request) -> None:
    """
    Copy the backend's status and headers to the client's response.
    """
    request.setResponseCode(response.code, response.phrase)
    # Twisted adds "Content-Type: text/html" to a response without one; a relayed
    # response keeps exactly the backend's content type, or none.
    request.defaultContentType = None

    # NOTE: Twisted's HTTP client keeps the backend's Connection header to itself
    # (it is not in response.headers), so a header that it names is relayed.
    dropped = _RESPONSE_HEADERS_NOT_RELAYED | _connection_listed(response.headers)
    for name, values in response.headers.getAllRawHeaders():
        if name.lower() not in dropped:
            request.responseHeaders.setRawHeaders(name, values)

    if isinstance(response.length, int):
        request.setHeader(b"content-length", str(response.length).encode("ascii"))

    content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
    if content_type.lower().startswith(_STREAM_CONTENT_TYPES):
        # An nginx in front of exoproxy would otherwise buffer the stream.
        request.setHeader(b"x-accel-buffering", b"no")
        if not request.responseHeaders.hasHeader(b"cache-control"):
            request.setHeader(b"cache-control", b"no-cache")


class _BodyRelay(Protocol):
    """
    Write the backend's response body to the client as it arrives.

    The backend's transport is registered as the producer of the client's
    response, so a slow client pauses the backend instead of filling memory.
    """

    def __init__(self, exchange: ProxiedExchange) -> None:
        self._exchange = exchange

    def connectionMade(self) -> None:
        self._exchange.body_started(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._exchange.body_received(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:
        self._exchange.body_ended(reason)


class ProxiedExchange:
    """
    One client request relayed to the backend, from the upstream request to the
    end of the client's response.

    C{on_end} is called once, when the exchange is over for any reason.
    """

    def __init__(
        self,
        request: Request,
        *,
        agent: IAgent,
        clock: IReactorTime,
        backend_url: str,
        idle_timeout: float,
        on_end: Callable[[], None],
        body: bytes | None = None,
        fallback: Callable[[], None] | None = None,
        on_backend_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """
        Args:
            body: the request body to send instead of the client's, after exoproxy
                has decoded it; its Content-Encoding is then not forwarded.
            fallback: answers the request instead of a 502 when no response came
                from the backend, for a polling route that has a local answer.
            on_backend_failure: called with the reason when the backend cannot be
                reached or breaks off its response, so that it is checked before
                the next request. A client that goes away is no such failure.
        """
        self._request = request
        self._body = body
        self._fallback = fallback
        self._agent = agent
        self._clock = clock
        self._backend_url = backend_url
        self._idle_timeout = idle_timeout
        self._on_end = on_end
        self._on_backend_failure = on_backend_failure
        self._requested: Deferred[IResponse] | None = None
        self._upstream_transport = None
        self._idle_call: IDelayedCall | None = None
        self._client_gone = False
        self._ended = False
        self.bytes_relayed = 0

    def start(self) -> None:
        request = self._request
        url = self._backend_url.encode("ascii") + request.uri

        headers = forwarded_headers(request.requestHeaders)
        producer = None
        if self._body is not None:
            headers.removeHeader(b"content-encoding")
            producer = FileBodyProducer(BytesIO(self._body))
        elif getattr(request, "body_stream", None) is not None:
            producer = request.body_stream
        elif request.content is not None and self._has_body():
            request.content.seek(0)
            producer = FileBodyProducer(request.content)

        self._requested = self._agent.request(request.method, url, headers, producer)
        self._requested.addCallbacks(self._got_response, self._request_failed)
        request.notifyFinish().addErrback(self._client_disconnected)
        self._reset_idle_timer()

    def _has_body(self) -> bool:
        headers = self._request.requestHeaders
        return headers.hasHeader(b"content-length") or headers.hasHeader(
            b"transfer-encoding"
        )

    def _reset_idle_timer(self) -> None:
        if self._idle_timeout <= 0 or self._ended:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._idle_timeout)
        else:
            self._idle_call = self._clock.callLater(
                self._idle_timeout, self._idle_timed_out
            )

    def _cancel_idle_timer(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_timed_out(self) -> None:
        self._idle_call = None
        log.warn(
            "The backend sent nothing for {timeout} s on {method} {path}; giving up",
            timeout=self._idle_timeout,
            method=self._request.method.decode("ascii", "replace"),
            path=self._request.path.decode("ascii", "replace"),
        )
        if self._upstream_transport is None:
            send_error(
                self._request,
                504,
                f"the Ollama backend sent nothing for {self._idle_timeout:g} s",
            )
            self._end()
            self._requested.cancel()
        else:
            # The client already has the status line, so only a cut connection
            # can tell it that the response is incomplete.
            self._upstream_transport.stopProducing()
            self._abort_client()

    def _got_response(self, response: IResponse) -> None:
        if self._client_gone:
            response.deliverBody(_Discard())
            return
        relay_response_headers(response, self._request)
        # twisted.web sends the status line and headers with the first write. An
        # empty write sends them now, so a client sees them before a slow body.
        self._request.write(b"")
        response.deliverBody(_BodyRelay(self))

    def _request_failed(self, failure: Failure) -> None:
        if self._client_gone or self._ended:
            return
        code, message = _describe_failure(failure, self._backend_url)
        log.warn(
            "Proxying {method} {path} failed: {error}",
            method=self._request.method.decode("ascii", "replace"),
            path=self._request.path.decode("ascii", "replace"),
            error=message,
        )
        if self._fallback is not None and code == 502:
            self._fallback()
        else:
            send_error(self._request, code, message)
        self._end()
        if not failure.check(CancelledError, ConnectingCancelledError):
            self._on_backend_failure(message)

    def body_started(self, transport) -> None:
        self._upstream_transport = transport
        self._request.registerProducer(transport, True)

    def body_received(self, data: bytes) -> None:
        if self._client_gone or self._ended:
            return
        self.bytes_relayed += len(data)
        self._request.write(data)
        self._reset_idle_timer()

    def body_ended(self, reason: Failure) -> None:
        if self._ended:
            return
        if not self._client_gone:
            self._request.unregisterProducer()
        if self._client_gone:
            self._end()
            return

        if reason.check(ResponseDone, PotentialDataLoss):
            self._request.finish()
        else:
            log.warn(
                "The backend broke off the response to {method} {path}: {error}",
                method=self._request.method.decode("ascii", "replace"),
                path=self._request.path.decode("ascii", "replace"),
                error=reason.getErrorMessage(),
            )
            self._abort_client()
            self._end()
            self._on_backend_failure("the backend broke off a response")
            return
        self._end()

    def _abort_client(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abortConnection()

    def _client_disconnected(self, failure: Failure) -> None:
        self._client_gone = True
        if self._ended:
            return
        log.info(
            "The client went away during {method} {path}; closing the backend "
            "connection",
            method=self._request.method.decode("ascii", "replace"),
            path=self._request.path.decode("ascii", "replace"),
        )
        if self._upstream_transport is not None:
            self._upstream_transport.stopProducing()
        elif self._requested is not None:
            self._requested.cancel()
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._cancel_idle_timer()
        self._on_end()


class _Discard(Protocol):
    """
    Read and drop a response body whose client is gone.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _describe_failure(failure: Failure, backend_url: str) -> tuple[int, str]:
    """
    Return the status code and message for a request that got no response.
    """
    if failure.check(ConnectTimeout):
        return 504, f"timed out connecting to the Ollama backend at {backend_url}"
    if failure.check(CancelledError, ConnectingCancelledError):
        return 504, f"the request to the Ollama backend at {backend_url} timed out"
    if failure.check(ConnectError, DNSLookupError):
        return 502, (
            f"cannot connect to the Ollama backend at {backend_url}: "
            f"{failure.getErrorMessage()}"
        )
    tls_error = find_tls_error(failure)
    if tls_error is not None:
        # The TLS policy logs the certificate that the backend presented.
        return 502, (
            f"the TLS handshake with the Ollama backend at {backend_url} failed "
            f"({describe_tls_error(tls_error)}), so the request was not sent"
        )
    if failure.check(ResponseNeverReceived, ResponseFailed):
        return 502, f"the Ollama backend at {backend_url} closed the connection"
    log.failure("Unexpected error while proxying", failure)
    return 502, f"proxying to the Ollama backend failed: {failure.getErrorMessage()}"
