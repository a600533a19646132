"""
Fixtures for the simulator tests: a running simulated zone on loopback with short
delays, an SDK client for it, and helpers to build user-data and to wait.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import time
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_twisted
import yaml
from exoscale.api.v2 import Client
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from exoproxy.simulator.cloud_init import OLLAMA_DROP_IN_PATH
from exoproxy.simulator.service import SimulatorService
from exoproxy.simulator.timers import SimulatorTimings

API_KEY = "EXOsimulatortestkey"
API_SECRET = "simulator-test-secret"

TINY_TIMINGS = SimulatorTimings(
    operation_delay=0.05,
    start_delay=0.05,
    stop_delay=0.05,
    boot_delay=0.05,
    pull_delay=0.1,
    token_interval=0.01,
)


def cloud_config(port: int | None = 0, models: tuple[str, ...] = ("llama3.2",)) -> str:
    """
    Build base64 user-data with an Ollama drop-in for `port` and a pull per model.
    """
    document: dict[str, Any] = {"runcmd": [["ollama", "pull", m] for m in models]}
    if port is not None:
        content = f'[Service]\nEnvironment="OLLAMA_HOST=0.0.0.0:{port}"\n'
        document["write_files"] = [{"path": OLLAMA_DROP_IN_PATH, "content": content}]
    text = "#cloud-config\n" + yaml.safe_dump(document)
    return base64.b64encode(text.encode()).decode()


def sleep(seconds: float) -> Deferred[None]:
    from twisted.internet import reactor

    return deferLater(reactor, seconds, lambda: None)


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01
) -> Any:
    """
    Poll `predicate` on the reactor until it returns a true value, and return it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{predicate} stayed false for {timeout} s")
        await sleep(interval)


def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    """
    Run a blocking call, such as an SDK method, in the reactor's thread pool.
    """
    return deferToThread(function, *args, **kwargs)


@contextlib.asynccontextmanager
async def running_simulator(**timings: float) -> AsyncIterator[SimulatorService]:
    """
    Run a simulator with `TINY_TIMINGS`, changed by `timings`, and stop it after.

    Tests that check a transient state use longer delays than `TINY_TIMINGS`, so
    that a poll from a slow thread pool on a loaded machine still returns that
    state.
    """
    from twisted.internet import reactor

    service = SimulatorService(
        reactor,
        api_key=API_KEY,
        api_secret=API_SECRET,
        timings=dataclasses.replace(TINY_TIMINGS, **timings),
    )
    service.startService()
    try:
        await service.when_listening()
        yield service
    finally:
        await service.stopService()


@pytest_twisted.async_yield_fixture
async def simulator():
    async with running_simulator() as service:
        yield service


@pytest.fixture
def sdk(simulator):
    client = Client(API_KEY, API_SECRET, url=simulator.api_url)
    yield client
    client.http_client.close()


def catalog_ids(cloud) -> tuple[str, str]:
    """
    Return the ids of the Ubuntu 24.04 template and the gpua5000.small type.
    """
    template_id = next(
        t["id"]
        for t in cloud.templates.values()
        if t["name"] == "Linux Ubuntu 24.04 LTS 64-bit"
    )
    type_id = next(
        t["id"]
        for t in cloud.instance_types.values()
        if (t["family"], t["size"]) == ("gpua5000", "small")
    )
    return template_id, type_id


def create_body(cloud, **fields: Any) -> dict[str, Any]:
    """
    Build a valid create-instance body, with `fields` added or replaced.
    """
    template_id, type_id = catalog_ids(cloud)
    body: dict[str, Any] = {
        "template": {"id": template_id},
        "instance-type": {"id": type_id},
        "disk-size": 50,
    }
    body.update(fields)
    return body
