"""
The write-through TCP transport, over real loopback sockets: bytes arrive
complete and in order, the socket is registered for writability only while data
is queued, producers are paused and resumed, and closing waits for queued data.
"""

from __future__ import annotations

import hashlib
import socket

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.server import Site
from twisted.web.static import Data
from zope.interface import implementer

from exoproxy.service import _server_endpoint
from exoproxy.write_through import WriteThroughReactor, WriteThroughServer


class Collector(Protocol):
    """
    A client that keeps what it receives and fires `closed` with it at the end.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.closed.callback(b"".join(self.chunks))


class Writer(Protocol):
    """
    A server protocol that runs `script` with its transport once connected.
    """

    def __init__(self, script) -> None:
        self.script = script
        self.made: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.script(self.transport)
        self.made.callback(None)


def writer_factory(script, protocols: list[Writer]) -> Factory:
    """
    Return a factory of L{Writer}s that run `script`, each added to `protocols`.
    """

    def build(address):
        protocol = Writer(script)
        protocols.append(protocol)
        return protocol

    factory = Factory.forProtocol(Protocol)
    factory.buildProtocol = build
    return factory


def listen(script, protocols: list[Writer]):
    factory = writer_factory(script, protocols)
    return WriteThroughReactor(reactor).listenTCP(0, factory, interface="127.0.0.1")


def connect(port):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    collector = Collector()
    # A transport that loses queued data would leave the test waiting forever.
    collector.closed.addTimeout(30, reactor)
    return endpoint.connect(Factory.forProtocol(lambda: collector)), collector


@inlineCallbacks
def receive_all(port):
    """
    Connect to `port`, return every byte received until the server closes the
    connection, and stop listening.
    """
    try:
        connecting, collector = connect(port)
        yield connecting
        received = yield collector.closed
    finally:
        yield port.stopListening()
    return received


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_small_write_sent_without_registering():
    registered = []

    def script(transport):
        transport.write(b"hello ")
        transport.writeSequence([b"wor", b"ld"])
        registered.append(transport in reactor.getWriters())
        transport.loseConnection()

    protocols: list[Writer] = []
    port = listen(script, protocols)
    received = yield receive_all(port)

    assert received == b"hello world"
    assert registered == [False]
    assert isinstance(protocols[0].transport, WriteThroughServer)


@pytest_twisted.inlineCallbacks
def test_large_writes_arrive_in_order():
    # 32 MiB is more than a loopback socket takes at once, so part of the first
    # write is queued, and the later small writes must wait behind it.
    block = bytes(range(256)) * 4096
    payload = [block * 32, b"tail-1", b"tail-2", block]
    registered = []

    def script(transport):
        transport.write(payload[0])
        registered.append(transport in reactor.getWriters())
        transport.write(payload[1])
        transport.writeSequence(payload[2:])
        transport.loseConnection()

    port = listen(script, [])
    received = yield receive_all(port)

    expected = b"".join(payload)
    assert len(received) == len(expected)
    assert hashlib.sha256(received).digest() == hashlib.sha256(expected).digest()
    assert registered == [True]


@implementer(IPushProducer)
class CountingProducer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_streaming_producer_paused_and_resumed():
    producer = CountingProducer()
    block = b"x" * (8 * 1024 * 1024)

    def script(transport):
        transport.registerProducer(producer, True)
        transport.write(block)
        transport.write(block)

    protocols: list[Writer] = []
    port = listen(script, protocols)
    try:
        connecting, collector = connect(port)
        yield connecting
        yield protocols[0].made
        paused_after_writes = producer.paused
        while sum(map(len, collector.chunks)) < 2 * len(block):
            yield sleep(0.01)
        yield sleep(0.05)
        resumed_after_drain = producer.resumed
        protocols[0].transport.unregisterProducer()
        protocols[0].transport.loseConnection()
        received = yield collector.closed
    finally:
        yield port.stopListening()

    assert paused_after_writes >= 1
    assert resumed_after_drain >= 1
    assert received == block + block


@pytest_twisted.inlineCallbacks
def test_write_after_peer_reset():
    protocols: list[Writer] = []
    port = listen(lambda transport: None, protocols)
    try:
        connecting, collector = connect(port)
        client = yield connecting
        yield protocols[0].made
        lost: Deferred[None] = Deferred()
        reasons = []

        def connection_lost(reason):
            reasons.append(reason)
            lost.callback(None)

        protocols[0].connectionLost = connection_lost
        # The reset reaches the server's socket at once on loopback, but the
        # server's reactor has not read it yet, so this send is the first to see
        # it and must close the connection without raising.
        client.transport.abortConnection()
        protocols[0].transport.write(b"x" * 65536)
        protocols[0].transport.write(b"y")
        yield lost
        yield collector.closed
    finally:
        yield port.stopListening()

    assert len(reasons) == 1


@pytest_twisted.inlineCallbacks
def test_daemon_tcp_listener_writes_through():
    site = Site(Data(b"ok", "text/plain"))
    port = yield _server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    try:
        assert port.transport is WriteThroughServer
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_adopted_socket_writes_through():
    # systemd passes a listening socket, which the systemd: endpoint adopts.
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(5)
    listening.setblocking(False)
    registered = []

    def script(transport):
        transport.write(b"adopted")
        registered.append(transport in reactor.getWriters())
        transport.loseConnection()

    protocols: list[Writer] = []
    port = WriteThroughReactor(reactor).adoptStreamPort(
        listening.fileno(), socket.AF_INET, writer_factory(script, protocols)
    )
    listening.close()
    received = yield receive_all(port)

    assert received == b"adopted"
    assert registered == [False]
    assert isinstance(protocols[0].transport, WriteThroughServer)


@pytest_twisted.inlineCallbacks
def test_unix_listener_keeps_twisted_transport(tmp_path):
    factory = Factory.forProtocol(Protocol)
    port = WriteThroughReactor(reactor).listenUNIX(str(tmp_path / "s"), factory)
    try:
        assert port.transport is not WriteThroughServer
    finally:
        yield port.stopListening()
