"""
TCP listeners whose connections send each write at once when nothing is queued.

Twisted's TCP transport (26.10) never sends from `write()`. It queues the data,
registers the socket for writability (with `epoll_ctl`, under the default epoll
reactor), sends from `doWrite()` on the next reactor iteration, and then
unregisters the socket with another `epoll_ctl`. A proxy that relays one streamed
line per write pays those two system calls and one more reactor event for every
line. The transport here tries `send()` first and falls back to Twisted's queue
only for what the socket does not accept at once, so the order of the bytes, the
backpressure on producers and the way a connection closes stay Twisted's.

On a 2-CPU machine, `python -m bench.compare` measured 12 % less CPU per relayed
line at 200 concurrent streams and 13 % less at 500. The p50 delay at 500 streams
fell to a seventh. Each load ran three rounds, and the transport won every round;
docs/benchmarks.md has the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IListeningPort


class WriteThroughServer(tcp.Server):
    """
    A server connection that sends a write immediately when its send queue is
    empty, and queues only what the socket does not accept.
    """

    # True while a write is sent at once. startWriting() then does nothing, and
    # _send_now() registers the socket only if data is left over.
    _sending_now = False

    def startWriting(self) -> None:
        if not self._sending_now:
            super().startWriting()

    def write(self, data: bytes) -> None:
        self._write(super().write, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self._write(super().writeSequence, iovec)

    def _write(self, queue: Callable[[Any], None], data: Any) -> None:
        # `queue` is Twisted's write or writeSequence, which checks the data and
        # the connection, queues the data and pauses a producer when it is full.
        if not self._may_send_now():
            queue(data)
            return
        self._sending_now = True
        try:
            queue(data)
        finally:
            self._sending_now = False
        self._send_now()

    # NOTE: dataBuffer, offset, _tempDataLen, _writeDisconnecting and TLS are
    # internals of Twisted's FileDescriptor and tcp.Connection (26.10).
    # tests/test_write_through.py checks this class against the installed Twisted.
    def _may_send_now(self) -> bool:
        # Anything already queued must go first, and Twisted's own path handles
        # closing, TLS started on this connection, and pull producers, which
        # doWrite() would otherwise resume from inside this write.
        return not (
            self._sending_now
            or self._tempDataLen
            or self.offset < len(self.dataBuffer)
            or self.disconnecting
            or self._writeDisconnecting
            or self.TLS
            or (self.producer is not None and not self.streamingProducer)
        )

    def _send_now(self) -> None:
        if not self._tempDataLen:
            # The write was empty, or the connection had already closed.
            return
        self._sending_now = True
        try:
            result = self.doWrite()
        finally:
            self._sending_now = False
        # doWrite() returns an error when the socket failed. The socket is then
        # registered anyway, so that the reactor's own doWrite() gets the same
        # error and closes the connection.
        if (
            result is not None
            or self._tempDataLen
            or self.offset < len(self.dataBuffer)
        ):
            super().startWriting()


class WriteThroughReactor:
    """
    A reactor whose TCP listening ports make L{WriteThroughServer} connections.
    Every other attribute is the wrapped reactor's.

    `serverFromString` builds `tcp:` endpoints, which call `listenTCP`, and
    `systemd:` endpoints, which call `adoptStreamPort`, so those listeners get
    the transport. `unix:` and `ssl:` listeners keep Twisted's.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        return _write_through(
            self._reactor.listenTCP(port, factory, backlog, interface)
        )

    def adoptStreamPort(
        self, fileDescriptor: int, addressFamily: int, factory: Any
    ) -> IListeningPort:
        return _write_through(
            self._reactor.adoptStreamPort(fileDescriptor, addressFamily, factory)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def _write_through(port: IListeningPort) -> IListeningPort:
    # A tcp.Port builds each accepted connection from its `transport` attribute
    # (Twisted 26.10), and it accepts none before the reactor runs again, so this
    # covers every connection. A unix.Port, a subclass, keeps its own transport.
    if type(port) is tcp.Port:
        port.transport = WriteThroughServer
    return port


__all__ = ["WriteThroughReactor", "WriteThroughServer"]
