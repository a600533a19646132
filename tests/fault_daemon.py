"""
A simulated zone that outlives the daemons which use it, for the fault tests.

The daemon runs in this process as in production, with credentials and
`--exoscale-api-url`, against a `SimulatorService` on loopback that the test starts.
So a daemon can stop, crash or restart while the zone, its instances and its armed
faults stay, and the test injects faults through `zone.cloud.faults`.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher

from exoproxy.simulator.service import SimulatorService
from exoproxy.simulator.timers import SimulatorTimings
from exoproxy.tap import Options, makeService
from tests.daemon import free_port

API_KEY = "EXO" + "f" * 24
MODEL = "granite3.1-dense:8b"
GENERATE = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()

FAST_TIMINGS = SimulatorTimings(
    operation_delay=0.05,
    start_delay=0.1,
    stop_delay=0.1,
    boot_delay=0.1,
    pull_delay=0.1,
    token_interval=0.01,
)

log = Logger()


class Zone:
    """
    A running simulated zone with its own API secret.
    """

    def __init__(
        self, timings: SimulatorTimings = FAST_TIMINGS, zone: str = "at-vie-2"
    ) -> None:
        self.secret = secrets.token_urlsafe(32)
        self.service = SimulatorService(
            reactor,
            api_key=API_KEY,
            api_secret=self.secret,
            timings=timings,
            zone=zone,
        )

    @property
    def cloud(self):
        return self.service.cloud

    @property
    def api_url(self) -> str:
        return self.service.api_url

    def calls(self, operation: str | None = None) -> list:
        return [
            call
            for call in self.cloud.calls
            if operation is None or call.operation == operation
        ]

    def states(self) -> list[str]:
        """
        Return the state of every instance that exists now.
        """
        return [instance.state.value for instance in self.cloud.instances.values()]

    def running(self) -> list[str]:
        return [
            instance.id
            for instance in self.cloud.instances.values()
            if instance.state.value in ("running", "starting")
        ]


def daemon_arguments(
    zone: Zone, state_dir: Path, secret: str | None = None, **overrides: Any
) -> tuple[list[str], dict[str, str]]:
    """
    Return the options and the environment of a daemon on `zone` with short
    delays. `overrides` replace or add options, and a value of None drops one.
    """
    settings: dict[str, Any] = {
        "listen": "tcp:0:interface=127.0.0.1",
        "api-key": API_KEY,
        "exoscale-api-url": zone.api_url,
        "allow-cidr": "127.0.0.0/8",
        "backend-port": str(free_port()),
        "state-dir": str(state_dir),
        "poll-interval": "0.05",
        "idle-timeout": "30",
        "idle-check-interval": "0.05",
        "ready-timeout": "20",
        "api-timeout": "2",
        "api-retry-delay": "0.05",
        "api-retry-max-delay": "0.2",
        "run-retry-delay": "0.3",
        "run-retry-max-delay": "1",
        "stop-timeout": "10",
        "shutdown-timeout": "5",
    }
    settings.update({key.replace("_", "-"): value for key, value in overrides.items()})
    arguments = []
    for name, value in settings.items():
        if value is not None:
            arguments += [f"--{name}", str(value)]
    return arguments, {"EXOSCALE_API_SECRET": secret or zone.secret}


@inlineCallbacks
def start_daemon(
    zone: Zone,
    state_dir: Path,
    secret: str | None = None,
    environ: dict[str, str] | None = None,
    **overrides: Any,
):
    """
    Start a daemon on `zone`, and return the service and its base URL.

    The daemon uses `secret` in place of the zone's own if given, and `environ` is
    added to its environment.
    """
    arguments, environment = daemon_arguments(zone, state_dir, secret, **overrides)
    options = Options(environ={**environment, **(environ or {})})
    options.parseOptions(arguments)
    service = makeService(options)
    service.startService()
    ports = yield service.when_listening()
    return service, f"http://127.0.0.1:{ports[0].getHost().port}"


@inlineCallbacks
def request(method: str, url: str, body: bytes | None = None, timeout: float = 30):
    """
    Send one request; return the status, the headers and the body.
    """
    sent = treq.request(method, url, data=body)
    response = yield sent.addTimeout(timeout, reactor)
    content = yield treq.content(response).addTimeout(timeout, reactor)
    return response.code, response.headers, content


@inlineCallbacks
def status_of(base_url: str):
    _, _, body = yield request("GET", f"{base_url}/status")
    return json.loads(body)


@inlineCallbacks
def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = ""):
    """
    Poll `check()` every 20 ms until it returns a true value, and return it.
    `check` may return a Deferred.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = yield check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        yield deferLater(reactor, 0.02, lambda: None)


@inlineCallbacks
def wait_for_status(base_url: str, predicate, timeout: float = 20.0):
    """
    Poll /status until `predicate(status)` is true, and return that status.
    """
    seen: list[dict[str, Any]] = []

    @inlineCallbacks
    def check():
        status = yield status_of(base_url)
        seen.append(status)
        return status if predicate(status) else None

    try:
        found = yield wait_until(check, timeout, "a /status")
    except AssertionError:
        raise AssertionError(f"/status never matched; last: {seen[-1:]}") from None
    return found


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


class CapturedLog:
    """
    Every log event of the process while it is installed, formatted with its
    traceback, if any.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def texts(self) -> list[str]:
        lines = []
        for event in self.events:
            text = formatEvent(event) or ""
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            lines.append(text)
        return lines

    def text(self) -> str:
        return "\n".join(self.texts())

    def failures(self) -> list[dict[str, Any]]:
        """
        Return the events that carry a traceback, or that are critical.
        """
        return [
            event
            for event in self.events
            if event.get("log_failure") is not None
            or event.get("log_level") == LogLevel.critical
        ]

    def matching(self, fragment: str) -> list[str]:
        return [text for text in self.texts() if fragment in text]

    def __enter__(self) -> CapturedLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


class Daemons:
    """
    The daemons that one test starts on its zone; those still running at the end
    of the test are stopped.

    They share the state directory and the backend port, as the daemons that
    follow each other on one host do, so that each can reach the instance that an
    earlier one created.
    """

    def __init__(self, zone: Zone, state_dir: Path) -> None:
        self._zone = zone
        self._state_dir = state_dir
        self.backend_port = free_port()
        self.running: list[Any] = []
        # Whether an instance may still run once every daemon has stopped, as
        # with --on-exit keep; otherwise the fixture checks that none does.
        self.instance_may_outlive = False

    @inlineCallbacks
    def start(
        self,
        secret: str | None = None,
        environ: dict[str, str] | None = None,
        **overrides: Any,
    ):
        overrides.setdefault("backend_port", str(self.backend_port))
        service, base_url = yield start_daemon(
            self._zone, self._state_dir, secret, environ, **overrides
        )
        self.running.append(service)
        return service, base_url

    @inlineCallbacks
    def stop(self, service: Any):
        self.running.remove(service)
        yield service.stopService()

    @inlineCallbacks
    def stop_all(self):
        while self.running:
            yield self.stop(self.running[-1])


@pytest.fixture
def zone():
    started = Zone()
    started.service.startService()
    pytest_twisted.blockon(started.service.when_listening())
    yield started
    pytest_twisted.blockon(started.service.stopService())


@pytest.fixture
def daemons(zone, tmp_path):
    started = Daemons(zone, tmp_path / "state")
    yield started
    pytest_twisted.blockon(started.stop_all())
    if not started.instance_may_outlive:
        assert zone.running() == [], "an instance still runs after the daemons"


@pytest.fixture
def captured_log():
    with CapturedLog() as captured:
        yield captured
