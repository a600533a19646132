"""
The daemon's service tree: the HTTP listeners, the lifecycle of the managed instance,
the idle timer and, with --simulate, the simulated cloud.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site

from exoproxy.activity import ActivityTracker
from exoproxy.catalog import BackendCatalog
from exoproxy.cloud import ExoscaleCloud
from exoproxy.config import Config
from exoproxy.cors import CorsPolicy
from exoproxy.gateway import BackendSource, Gateway
from exoproxy.lifecycle import Backend, InstanceLifecycle
from exoproxy.provisioner import ExoscaleProvisioner, json_fetcher
from exoproxy.routes import streams_request_body
from exoproxy.sources import FixedBackendSource, LifecycleSource
from exoproxy.status import build_status
from exoproxy.streaming import StreamingRequest

log = Logger()


def _access_log_line(timestamp: str, request: Any) -> str:
    """
    Format an access log line without the query string, which may carry tokens.
    """
    path = request.path.decode("utf-8", "replace")
    if b"?" in request.uri:
        path += "?[redacted]"
    client = request.getClientAddress()
    host = getattr(client, "host", "-")
    return (
        f'{host} - - {timestamp} "{request.method.decode("ascii", "replace")} '
        f'{path} {request.clientproto.decode("ascii", "replace")}" '
        f"{request.code} {request.sentLength or '-'}"
    )


class _ExoproxyRequest(StreamingRequest):
    streams_body = staticmethod(streams_request_body)


class _QuietClientFactory(_HTTP11ClientFactory):
    # The pool makes one factory per backend connection; logging each start and
    # stop would fill the log.
    noisy = False


class ExoproxyService(MultiService):
    """
    One exoproxy daemon. It starts listening once its parts are ready; use
    L{when_listening} to learn the bound ports.
    """

    def __init__(self, config: Config, *, reactor: Any, clock: Any = None) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._ports: list[IListeningPort] = []
        self._listening: Deferred[list[IListeningPort]] = Deferred()
        self._started_at = time.time()
        self.simulator: Any = None
        self.cloud: ExoscaleCloud | None = None
        self.lifecycle: InstanceLifecycle | None = None
        self.activity = ActivityTracker(self._clock)
        self.catalog = BackendCatalog(config.model)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 32
        self._pool._factory = _QuietClientFactory
        self._agent = Agent(
            reactor, connectTimeout=config.connect_timeout, pool=self._pool
        )
        self._idle_loop = LoopingCall(self._check_idle)
        self._idle_loop.clock = self._clock

    def when_listening(self) -> Deferred[list[IListeningPort]]:
        """
        Return a Deferred that fires with the listening ports once they are bound.
        """
        if self._listening.called:
            return succeed(self._ports)
        waiting: Deferred[list[IListeningPort]] = Deferred()
        self._listening.addBoth(lambda result: (waiting.callback(result), result)[1])
        return waiting

    def startService(self) -> None:
        super().startService()
        self._start().addErrback(self._failed_to_start)

    def _failed_to_start(self, failure: Any) -> None:
        log.failure("exoproxy failed to start", failure)
        if not self._listening.called:
            self._listening.errback(failure)
        if self._reactor.running:
            self._reactor.stop()

    @inlineCallbacks
    def _start(self):
        config = self.config
        source = yield self._make_source()
        gateway = Gateway(
            source=source,
            activity=self.activity,
            catalog=self.catalog,
            agent=self._agent,
            clock=self._clock,
            status=lambda: build_status(self, source),
            cors=CorsPolicy(config.allowed_origins),
            upstream_idle_timeout=config.upstream_idle_timeout,
            local_routes=config.local_routes,
            hold_timeout=config.hold_timeout,
            max_held_requests=config.max_held_requests,
        )
        self.gateway = gateway
        site = Site(
            gateway,
            logFormatter=_access_log_line,
            reactor=self._reactor,
            parsePOSTFormSubmission=False,
        )
        site.requestFactory = _ExoproxyRequest
        site.noisy = False

        for description in config.listen:
            port = yield serverFromString(self._reactor, description).listen(site)
            self._ports.append(port)
            log.info("exoproxy listening on {address}", address=str(port.getHost()))
        if self.lifecycle is not None:
            self._idle_loop.start(config.idle_check_interval, now=False)
        self._listening.callback(self._ports)

    @inlineCallbacks
    def _make_source(self):
        config = self.config
        if config.fixed_backend:
            log.info(
                "Proxying to the fixed backend {url}; no cloud calls are made",
                url=config.backend_url,
            )
            return FixedBackendSource(Backend(url=config.backend_url))

        api_url = config.api_url
        if config.simulate:
            api_url = yield self._start_simulator()

        self.cloud = ExoscaleCloud(
            self._reactor,
            self._clock,
            api_url=api_url,
            api_key=config.api_key,
            api_secret=config.api_secret,
            timeout=config.api_timeout,
            max_threads=config.api_threads,
            poll_interval=config.poll_interval,
        )
        self.cloud.start()
        provisioner = ExoscaleProvisioner(
            self.cloud,
            self._clock,
            config,
            json_fetcher(self._agent, self._clock, timeout=10),
            self.catalog,
        )
        self.provisioner = provisioner
        self.lifecycle = InstanceLifecycle(
            self._clock, provisioner, on_ready=lambda backend: self.activity.touch()
        )
        log.info(
            "Managing instance {name} ({instance_type}) in zone {zone} through "
            "{api_url}",
            name=config.instance_name,
            instance_type=str(config.instance_type),
            zone=config.zone,
            api_url=api_url,
        )
        return LifecycleSource(self.lifecycle, config)

    @inlineCallbacks
    def _start_simulator(self):
        from exoproxy.simulator.service import SimulatorService
        from exoproxy.simulator.timers import SimulatorTimings

        timings = SimulatorTimings(boot_delay=self.config.simulate_boot_delay)
        self.simulator = SimulatorService(
            self._reactor,
            api_key=self.config.api_key,
            api_secret=self.config.api_secret,
            timings=timings,
            zone=self.config.zone,
        )
        self.simulator.setServiceParent(self)
        yield self.simulator.when_listening()
        log.warn(
            "SIMULATED CLOUD: no Exoscale account is used; the simulated API is at "
            "{api_url}",
            api_url=self.simulator.api_url,
        )
        return self.simulator.api_url

    def _check_idle(self) -> None:
        if self.activity.idle_for() >= self.config.idle_timeout:
            self.lifecycle.inputs.idle_expired()

    @inlineCallbacks
    def stopService(self):
        log.info("exoproxy is stopping")
        if self._idle_loop.running:
            self._idle_loop.stop()
        stopping = [port.stopListening() for port in self._ports]
        self._ports = []
        yield DeferredList(stopping)
        if self.lifecycle is not None:
            self.lifecycle.cancel()
        yield self._pool.closeCachedConnections()
        if self.cloud is not None:
            # Joining the pool's threads waits for calls in progress, which end
            # within the API timeout; a reactor thread does the waiting.
            yield deferToThread(self.cloud.stop)
        yield super().stopService()
        log.info("exoproxy stopped")

    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def source_kind(self) -> str:
        if self.config.fixed_backend:
            return "fixed"
        return "simulated" if self.config.simulate else "exoscale"


__all__ = ["ExoproxyService", "BackendSource"]
