"""
Loopback HTTP listeners that can be closed together with their open connections.

A simulated server that goes away must look like a machine that went away: its port
stops accepting and every open connection breaks, including idle keep-alive ones that
`IListeningPort.stopListening` alone leaves open.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IOpenSSLServerConnectionCreator
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Request, Site


class _TrackedConnection(ProtocolWrapper):
    def connectionLost(self, reason: Failure) -> None:
        factory = self.factory
        super().connectionLost(reason)
        # The wrapper unregisters itself before the wrapped protocol has handled the
        # loss, so the waiters fire only after both are done.
        factory.connection_closed()


class ConnectionTrackingFactory(WrappingFactory):
    """
    A wrapper of a factory that can abort every connection it built.
    """

    protocol = _TrackedConnection

    def __init__(self, wrapped_factory: Site) -> None:
        super().__init__(wrapped_factory)
        self._idle_waiters: list[Deferred[None]] = []

    def connection_closed(self) -> None:
        """
        Fire the waiters of `abort_connections` once no connection is left.
        """
        if self.protocols:
            return

        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def abort_connections(self) -> Deferred[None]:
        """
        Abort every open connection.

        Returns:
            A Deferred that fires once every connection is lost.
        """
        if not self.protocols:
            return succeed(None)

        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        for wrapper in list(self.protocols):
            wrapper.transport.abortConnection()
        return waiter


def _access_log_line(timestamp: str, request: Request) -> str:
    """
    Format an access log line without the query string, which may carry a
    client's token that exoproxy relayed: with --simulate, this log is the
    daemon's own.
    """
    path = request.path.decode("ascii", "replace")
    if b"?" in request.uri:
        path += "?[redacted]"
    host = getattr(request.getClientAddress(), "host", "-")
    method = request.method.decode("ascii", "replace")
    version = request.clientproto.decode("ascii", "replace")
    return (
        f'"{host}" - - {timestamp} "{method} {path} {version}" {request.code} '
        f"{request.sentLength or '-'}"
    )


def require_loopback(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    Parse `host` as an IP address and check that it is a loopback address.

    Raises:
        ValueError: `host` is not an IP literal, or not in 127.0.0.0/8 or ::1.
    """
    address = ipaddress.ip_address(host)
    if not address.is_loopback:
        raise ValueError(
            f"Simulated servers listen on loopback addresses only, not {host!r}"
        )
    return address


class LoopbackListener:
    """
    One HTTP site listening on a loopback address.

    Args:
        reactor: The reactor to listen with.
        host: A loopback IP literal to bind.
        port: The TCP port to bind, or 0 for any free port.
        resource: The root resource of the site.
        tls: The server TLS options, to serve HTTPS instead of HTTP.
    """

    def __init__(
        self,
        reactor,
        host: str,
        port: int,
        resource: IResource,
        tls: IOpenSSLServerConnectionCreator | None = None,
    ) -> None:
        self._address = require_loopback(host)
        self._reactor = reactor
        self._port_number = port
        site = Site(resource, reactor=reactor, logFormatter=_access_log_line)
        site.noisy = False
        self._factory = ConnectionTrackingFactory(site)
        self._factory.noisy = False
        self._tls = tls
        self._listening_port: IListeningPort | None = None
        self._closed = False

    def listen(self) -> Deferred[int]:
        """
        Start listening.

        Returns:
            A Deferred that fires with the bound port number, or fails with
            `twisted.internet.error.CannotListenError`.
        """
        if isinstance(self._address, ipaddress.IPv6Address):
            endpoint = TCP6ServerEndpoint(
                self._reactor, self._port_number, interface=str(self._address)
            )
        else:
            endpoint = TCP4ServerEndpoint(
                self._reactor, self._port_number, interface=str(self._address)
            )

        def listening(listening_port: IListeningPort) -> int:
            if self._closed:
                listening_port.stopListening()
            else:
                self._listening_port = listening_port
            return listening_port.getHost().port

        factory = self._factory
        if self._tls is not None:
            # The tracked connections sit inside TLS, so aborting one aborts the
            # TLS connection and its socket.
            factory = TLSMemoryBIOFactory(self._tls, False, self._factory)
            factory.noisy = False
        return endpoint.listen(factory).addCallback(listening)

    def close(self) -> Deferred[None]:
        """
        Stop listening and abort every open connection.

        Returns:
            A Deferred that fires once the port is closed and every connection is lost.
        """
        self._closed = True
        closing: list[Deferred[object]] = []
        if self._listening_port is not None:
            closing.append(self._listening_port.stopListening())
            self._listening_port = None
        closing.append(self._factory.abort_connections())

        done = DeferredList(closing, consumeErrors=True)
        return done.addCallback(lambda _: None)
