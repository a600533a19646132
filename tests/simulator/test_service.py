"""
The simulator service: where it listens, what it logs, and that stopping it closes
every port, connection and timer that it opened.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from exoscale.api.v2 import Client
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher

from exoproxy.simulator.service import SimulatorService

from .conftest import (
    API_KEY,
    API_SECRET,
    TINY_TIMINGS,
    cloud_config,
    create_body,
    in_thread,
    wait_for,
)


class IdleClient(Protocol):
    """
    A client that connects and sends nothing, like an idle keep-alive connection.
    """

    def __init__(self) -> None:
        self.lost = False

    def connectionLost(self, reason) -> None:
        self.lost = True


def make_service(**overrides) -> SimulatorService:
    from twisted.internet import reactor

    arguments = {"api_key": API_KEY, "api_secret": API_SECRET, "timings": TINY_TIMINGS}
    arguments.update(overrides)
    return SimulatorService(reactor, **arguments)


async def connect(host: str, port: int, protocol: Protocol) -> Protocol:
    from twisted.internet import reactor

    return await connectProtocol(TCP4ClientEndpoint(reactor, host, port), protocol)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "localhost"])
def test_non_loopback_host_rejected(host):
    with pytest.raises(ValueError):
        make_service(listen_host=host)


@pytest_twisted.ensureDeferred
async def test_api_url_after_listening():
    service = make_service()
    with pytest.raises(RuntimeError):
        service.api_url

    waiting = service.when_listening()
    service.startService()
    try:
        api_url = await waiting
        assert api_url == service.api_url
        assert api_url.startswith("http://127.0.0.1:")
        assert api_url.endswith("/v2")
        assert await service.when_listening() == api_url
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_listen_failure_reported():
    occupied = socket.socket()
    occupied.bind(("127.0.0.1", 0))
    occupied.listen()
    service = make_service(port=occupied.getsockname()[1])
    try:
        service.startService()
        with pytest.raises(Exception, match="Address already in use|Couldn't listen"):
            await service.when_listening()
    finally:
        await service.stopService()
        occupied.close()


@pytest_twisted.ensureDeferred
async def test_logs_simulated_cloud():
    events = []
    globalLogPublisher.addObserver(events.append)
    service = make_service()
    try:
        service.startService()
        api_url = await service.when_listening()
    finally:
        await service.stopService()
        globalLogPublisher.removeObserver(events.append)

    [started] = [
        e for e in events if "SIMULATED" in e.get("log_format", "") and "api_url" in e
    ]
    assert started["api_url"] == api_url
    assert started["zone"] == "at-vie-2"
    assert started["log_level"].name == "warn"


@pytest_twisted.ensureDeferred
async def test_logs_instance_states():
    events = []
    globalLogPublisher.addObserver(events.append)
    service = make_service()
    try:
        service.startService()
        await service.when_listening()
        operation = service.cloud.create_instance(create_body(service.cloud))
        instance = service.cloud.instances[operation["reference"]["id"]]
        await wait_for(lambda: instance.state.value == "running")
    finally:
        await service.stopService()
        globalLogPublisher.removeObserver(events.append)

    states = [
        e["state"]
        for e in events
        if e.get("instance_id") == instance.id and "state" in e
    ]
    assert states == ["starting", "running"]


@pytest_twisted.ensureDeferred
async def test_stop_closes_everything():
    from twisted.internet import reactor

    timers_before = set(reactor.getDelayedCalls())
    service = make_service()
    service.startService()
    api_url = await service.when_listening()
    api_port = int(api_url.rsplit(":", 1)[1].split("/")[0])

    sdk = Client(API_KEY, API_SECRET, url=api_url)
    body = create_body(service.cloud, **{"user-data": cloud_config(port=0)})
    body = {key.replace("-", "_"): value for key, value in body.items()}
    operation = await in_thread(sdk.create_instance, **body)
    instance = service.cloud.instances[operation["reference"]["id"]]
    await wait_for(lambda: instance.ollama_port)
    ollama_address = (instance.public_ip, instance.ollama_port)

    api_client = await connect("127.0.0.1", api_port, IdleClient())
    ollama_client = await connect(*ollama_address, IdleClient())
    # A second instance that is still starting leaves timers pending.
    service.cloud.create_instance(create_body(service.cloud))

    await service.stopService()

    assert set(reactor.getDelayedCalls()) - timers_before == set()
    await wait_for(lambda: api_client.lost, timeout=1)
    await wait_for(lambda: ollama_client.lost, timeout=1)
    with pytest.raises(ConnectionRefusedError):
        await connect("127.0.0.1", api_port, Protocol())
    with pytest.raises(ConnectionRefusedError):
        await connect(*ollama_address, Protocol())
    sdk.http_client.close()


@pytest_twisted.ensureDeferred
async def test_restart_listens_again():
    service = make_service()
    service.startService()
    first_url = await service.when_listening()
    await service.stopService()

    service.startService()
    try:
        second_url = await service.when_listening()
        listed = await in_thread(Client(API_KEY, API_SECRET, url=second_url).list_zones)
    finally:
        await service.stopService()

    assert second_url.startswith("http://127.0.0.1:")
    assert listed["zones"][0]["api-endpoint"] == second_url
    assert first_url.endswith("/v2")


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback here")
@pytest_twisted.ensureDeferred
async def test_ipv6_loopback():
    service = make_service(listen_host="::1")
    service.startService()
    try:
        api_url = await service.when_listening()
        listed = await in_thread(
            Client(API_KEY, API_SECRET, url=api_url).list_instances
        )
    finally:
        await service.stopService()

    assert api_url.startswith("http://[::1]:")
    assert listed == {"instances": []}
