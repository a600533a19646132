"""
Request bodies that stream to the backend while they arrive.

twisted.web (up to 26.10 at least) renders a request only after its whole body has
arrived, and spools a large body to a temporary file first. For a blob upload of
several GiB that doubles the time and fills the disk, so exoproxy renders such a
request as soon as its headers are in, and hands the body to the upstream request
chunk by chunk, with backpressure both ways.
"""

from __future__ import annotations

from io import BytesIO
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

# Buffered body bytes, before the upstream request takes them, at which the client
# connection stops being read.
_BUFFER_LIMIT = 1024 * 1024


@implementer(IBodyProducer)
class RequestBodyStream:
    """
    The body of a client request as an L{IBodyProducer} for the upstream request.

    Data that arrives before the upstream request starts producing is buffered, up
    to a limit past which the client connection is paused.
    """

    def __init__(
        self, length: int | None, pause: Callable[[], None], resume: Callable[[], None]
    ) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pause_client = pause
        self._resume_client = resume
        self._consumer: IConsumer | None = None
        self._buffered: list[bytes] = []
        self._buffered_size = 0
        self._complete = False
        self._paused_for_buffer = False
        self._producing: Deferred[None] | None = None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._producing = Deferred(lambda _: self._resume_client())
        for chunk in self._buffered:
            consumer.write(chunk)
        self._buffered = []
        if self._paused_for_buffer:
            self._paused_for_buffer = False
            self._resume_client()
        if self._complete:
            self._producing.callback(None)
        return self._producing

    def received(self, data: bytes) -> None:
        """
        Pass on one chunk of the client's body.
        """
        if self._consumer is not None:
            self._consumer.write(data)
            return
        self._buffered.append(data)
        self._buffered_size += len(data)
        if self._buffered_size > _BUFFER_LIMIT and not self._paused_for_buffer:
            self._paused_for_buffer = True
            self._pause_client()

    def completed(self) -> None:
        """
        Record that the client's body has ended.
        """
        self._complete = True
        if self._producing is not None and not self._producing.called:
            self._producing.callback(None)

    def pauseProducing(self) -> None:
        self._pause_client()

    def resumeProducing(self) -> None:
        self._resume_client()

    def stopProducing(self) -> None:
        # The upstream request has failed; its error response ends the client's
        # request and closes the connection, which still has unread body bytes.
        self._consumer = None


class StreamingRequest(Request):
    """
    A request that is rendered as soon as its headers arrive when
    C{streams_body(method, path)} is true, with its body in C{body_stream}.

    The other requests behave exactly as L{Request}.
    """

    streams_body: Callable[[bytes, bytes], bool] = staticmethod(
        lambda method, path: False
    )
    body_stream: RequestBodyStream | None = None
    _rendered_early = False

    def gotLength(self, length: int | None) -> None:
        # HTTPChannel keeps the request line in private attributes until the body
        # has arrived (Twisted 16 to 26); nothing public has it this early.
        channel = self.channel
        method, uri, version = channel._command, channel._path, channel._version
        path = uri.split(b"?", 1)[0]
        if not self.streams_body(method, path):
            super().gotLength(length)
            return

        self.content = BytesIO()
        transport = channel.transport
        self.body_stream = RequestBodyStream(
            length, pause=transport.pauseProducing, resume=transport.resumeProducing
        )
        self._rendered_early = True
        # Rendering waits for the next reactor turn: a response that finished
        # right here would remove the request from the channel while the channel
        # still parses its body from the same buffer.
        channel.site.reactor.callLater(0, self._render_early, method, uri, version)

    def _render_early(self, method: bytes, uri: bytes, version: bytes) -> None:
        if self._disconnected:
            return
        super().requestReceived(method, uri, version)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_stream is not None:
            self.body_stream.received(data)
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rendered_early:
            self.body_stream.completed()
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        if self.body_stream is not None and not self.body_stream._complete:
            # The response is complete before the body is; the rest of the body
            # cannot be skipped reliably, so the connection ends with the response.
            self.channel.persistent = False
        super().finish()
