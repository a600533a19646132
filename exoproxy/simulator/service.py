"""
The simulated Exoscale cloud as a Twisted service.

`SimulatorService` serves the simulated API on a loopback address. The daemon's SDK
client reaches it through `api_url`, over a real socket, as it would reach Exoscale.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from exoproxy.simulator.cloud import SimulatedCloud
from exoproxy.simulator.control import ControlResource
from exoproxy.simulator.exoscale_api import ApiRoot, ExoscaleApiResource
from exoproxy.simulator.listener import LoopbackListener, require_loopback
from exoproxy.simulator.timers import SimulatorTimings

log = Logger()


class SimulatorService(MultiService):
    """
    A simulated Exoscale zone, with its API listening on a loopback address.

    Args:
        reactor: The reactor to listen with and to time the simulation with.
        api_key: The one API key that the simulated API accepts.
        api_secret: The secret of `api_key`.
        timings: The simulated delays. None selects the `SimulatorTimings` defaults.
        zone: The zone name.
        listen_host: A loopback IP literal to listen on.
        port: The TCP port to listen on, or 0 for any free port.
        new_ip_on_start: Give an instance a new public IP each time it starts.

    Raises:
        ValueError: `listen_host` is not a loopback IP literal.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        api_key: str,
        api_secret: str,
        timings: SimulatorTimings | None = None,
        zone: str = "at-vie-2",
        listen_host: str = "127.0.0.1",
        port: int = 0,
        new_ip_on_start: bool = False,
    ) -> None:
        super().__init__()
        require_loopback(listen_host)
        self.cloud = SimulatedCloud(
            reactor, reactor, timings, zone=zone, new_ip_on_start=new_ip_on_start
        )
        api = ExoscaleApiResource(self.cloud, {api_key: api_secret}, reactor)
        self._root = ApiRoot(api)
        self._root.putChild(b"_control", ControlResource(self.cloud.faults))
        self._reactor = reactor
        self._listen_host = listen_host
        self._port = port
        self._listener: LoopbackListener | None = None
        self._api_url: str | None = None
        self._listen_failure: Failure | None = None
        self._waiting: list[Deferred[str]] = []

    @property
    def api_url(self) -> str:
        """
        The URL of the simulated API, such as `http://127.0.0.1:PORT/v2`, to pass as
        the SDK's `url=`.

        Raises:
            RuntimeError: The service is not listening yet.
        """
        if self._api_url is None:
            raise RuntimeError("The simulator is not listening yet")
        return self._api_url

    def when_listening(self) -> Deferred[str]:
        """
        Wait until the API listens.

        Returns:
            A Deferred that fires with `api_url`, or fails if listening failed.
        """
        if self._api_url is not None:
            return succeed(self._api_url)
        if self._listen_failure is not None:
            return fail(self._listen_failure)

        waiter: Deferred[str] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        self._listen_failure = None
        self._listener = LoopbackListener(
            self._reactor, self._listen_host, self._port, self._root
        )
        self._listener.listen().addCallbacks(self._listening, self._listen_failed)

    def _listening(self, port: int) -> None:
        host = (
            f"[{self._listen_host}]" if ":" in self._listen_host else self._listen_host
        )
        self._api_url = f"http://{host}:{port}/v2"
        log.warn(
            "SIMULATED Exoscale cloud for zone {zone} listening at {api_url}: no real "
            "instance is created, and instances are fake Ollama servers on loopback "
            "addresses",
            zone=self.cloud.zone,
            api_url=self._api_url,
        )
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(self._api_url)

    def _listen_failed(self, failure: Failure) -> None:
        log.failure("The simulated Exoscale API cannot listen", failure)
        self._listen_failure = failure
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.errback(failure)

    def stopService(self) -> Deferred[None]:
        """
        Close the API port, every simulated Ollama server and all their connections,
        and cancel every simulated delay.
        """
        stopping = [super().stopService(), self.cloud.stop()]
        if self._listener is not None:
            stopping.append(self._listener.close())
            self._listener = None
        self._api_url = None
        done = DeferredList(stopping, consumeErrors=True)

        def stopped(_: object) -> None:
            log.info(
                "SIMULATED Exoscale cloud for zone {zone} stopped", zone=self.cloud.zone
            )

        return done.addCallback(stopped)
