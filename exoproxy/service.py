"""
The daemon's service tree: the HTTP listeners, the lifecycle of the managed instance,
the idle timer and, with --simulate, the simulated cloud.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from exoproxy.access_log import AccessLoggedRequest, AccessLogSite
from exoproxy.activity import ActivityTracker
from exoproxy.auth import ClientTokens
from exoproxy.backend_agent import BackendAgent, BackendEndpoints, BackendTLSPolicy
from exoproxy.backend_tls import BackendKeyring, MaterialError, MaterialStore
from exoproxy.catalog import BackendCatalog
from exoproxy.cloud import ExoscaleCloud
from exoproxy.config import Config, ConfigError
from exoproxy.cors import CorsPolicy
from exoproxy.gateway import BackendSource, Gateway
from exoproxy.lifecycle import InstanceLifecycle
from exoproxy.lifecycle_interfaces import Backend
from exoproxy.logs import give_observer_to_twistd
from exoproxy.metrics import DaemonMetrics
from exoproxy.notify import SystemdNotifier, status_line
from exoproxy.ollama_readiness import json_fetcher
from exoproxy.provisioner import ExoscaleProvisioner
from exoproxy.retry import RetryPolicy
from exoproxy.routes import streams_request_body
from exoproxy.shutdown import shut_down_instance
from exoproxy.sources import FixedBackendSource, LifecycleSource
from exoproxy.status import build_status
from exoproxy.streaming import StreamingRequest
from exoproxy.write_through import WriteThroughReactor

log = Logger()


def _server_endpoint(reactor: Any, description: str) -> Any:
    """
    Parse a --listen or --metrics-listen endpoint string. The connections of a
    `tcp:` or `systemd:` endpoint send each write at once (WriteThroughServer).

    Raises:
        ValueError: a systemd: endpoint names a socket that was not inherited.
    """
    try:
        return serverFromString(WriteThroughReactor(reactor), description)
    except (IndexError, KeyError):
        if not description.startswith("systemd:"):
            raise
        # Twisted (26.10) finds no inherited socket unless LISTEN_PID is this
        # process and LISTEN_FDNAMES has one name per socket, which
        # systemd-socket-activate only sets with --fdname.
        raise ValueError(
            f"{description}: no such socket was inherited from systemd; start "
            "exoproxy through exoproxy.socket, or give systemd-socket-activate "
            "--fdname=exoproxy"
        ) from None


class _ExoproxyRequest(AccessLoggedRequest, StreamingRequest):
    streams_body = staticmethod(streams_request_body)


# Startup failures that come from the configuration or the host rather than a bug.
_STARTUP_ERRORS = (
    CannotListenError,
    ValueError,
    OverflowError,
    OSError,
    ConfigError,
    MaterialError,
)


class _QuietClientFactory(_HTTP11ClientFactory):
    # The pool makes one factory per backend connection; logging each start and
    # stop would fill the log.
    noisy = False


class ExoproxyService(MultiService):
    """
    One exoproxy daemon. It starts listening once its parts are ready; use
    L{when_listening} to learn the bound ports.
    """

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        clock: Any = None,
        metrics_listen: tuple[str, ...] = (),
        notifier: SystemdNotifier | None = None,
        log_observer: ILogObserver | None = None,
    ) -> None:
        """
        Args:
            metrics_listen: endpoint strings that serve only `/metrics`. When there
                are any, the main listeners respond to `/metrics` with 404.
            notifier: where readiness and status go, for systemd's Type=notify.
            log_observer: the observer that twistd logs through, when it runs
                this service; None keeps twistd's own.
        """
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
        # Both the proxy and the readiness checks reach the instance through this
        # agent, so both verify its certificate and send its bearer secret.
        self.backend_tls = BackendTLSPolicy(self._clock)
        endpoints = BackendEndpoints(reactor, self.backend_tls, config.connect_timeout)
        self._agent = BackendAgent(
            Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool),
            self.backend_tls,
        )
        self._temporary_state_dir: str | None = None
        self._idle_loop = LoopingCall(self._check_idle)
        self._idle_loop.clock = self._clock
        self.metrics = DaemonMetrics(self._clock)
        self._metrics_listen = metrics_listen
        self.metrics_ports: list[IListeningPort] = []
        self._notifier = notifier if notifier is not None else SystemdNotifier(None)
        self._log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        if self._log_observer is not None:
            give_observer_to_twistd(parent, self._log_observer)
        super().setServiceParent(parent)

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
        if failure.check(*_STARTUP_ERRORS):
            # An operator's mistake, such as a port in use: one line, no traceback.
            log.error(
                "exoproxy failed to start: {error}", error=failure.getErrorMessage()
            )
        else:
            log.failure("exoproxy failed to start", failure)
        self._notifier.status(f"failed to start: {failure.getErrorMessage()}")
        if not self._listening.called:
            self._listening.errback(failure)
        # twistd exits with status 0 after reactor.stop(). A supervisor such as
        # systemd must see the failure, so the process ends with 1 after shutdown.
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self._reactor.running:
            self._reactor.stop()
        else:
            # twistd starts the service before the reactor, so a failure that
            # comes at once would otherwise leave a daemon that listens nowhere.
            self._reactor.callWhenRunning(self._reactor.stop)

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
            status=lambda: self._status(source),
            cors=CorsPolicy(config.allowed_origins),
            upstream_idle_timeout=config.upstream_idle_timeout,
            local_routes=config.local_routes,
            hold_timeout=config.hold_timeout,
            max_held_requests=config.max_held_requests,
            metrics=self.metrics,
            serves_metrics=not self._metrics_listen,
            client_tokens=(
                ClientTokens(config.client_tokens, self._clock)
                if config.client_tokens
                else None
            ),
            on_backend_failure=self._backend_failed,
        )
        self.gateway = gateway
        self.metrics.held_requests.set_function(lambda: gateway.held_requests)
        site = AccessLogSite(
            gateway,
            metrics=self.metrics,
            reactor=self._reactor,
            parsePOSTFormSubmission=False,
            timeout=config.client_timeout,
        )
        site.requestFactory = _ExoproxyRequest
        site.noisy = False

        for description in config.listen:
            port = yield _server_endpoint(self._reactor, description).listen(site)
            self._ports.append(port)
            log.info("exoproxy listening on {address}", address=str(port.getHost()))
        yield self._listen_for_metrics()
        if self.lifecycle is not None:
            self._idle_loop.start(config.idle_check_interval, now=False)
        self._listening.callback(self._ports)
        if self.lifecycle is not None and not config.simulate:
            # A daemon that restarts finds the instance that its predecessor left
            # running, so that the idle timer stops it. The simulated cloud starts
            # empty, so there is nothing to find.
            self.lifecycle.adopt()

        if config.fixed_backend:
            self._notifier.ready(f"ready: proxying to {config.backend_url}")
        else:
            self._notifier.ready("idle: waiting for a request that needs the model")

    @inlineCallbacks
    def _listen_for_metrics(self):
        if not self._metrics_listen:
            return
        site = AccessLogSite(
            self.metrics.site_root(),
            metrics=self.metrics,
            reactor=self._reactor,
            parsePOSTFormSubmission=False,
        )
        site.noisy = False
        for description in self._metrics_listen:
            port = yield _server_endpoint(self._reactor, description).listen(site)
            self.metrics_ports.append(port)
            log.info(
                "Metrics listening on {address}; the main listeners respond to "
                "/metrics with 404",
                address=str(port.getHost()),
            )

    def _phase_changed(self, state: str, phase: str) -> None:
        # Called from inside a lifecycle transition: reading the lifecycle's error
        # is safe, asking its state is not.
        self.metrics.phase_changed(state, phase)
        error = self.lifecycle.error if self.lifecycle is not None else None
        self._notifier.status(status_line(state, phase, error))

    @inlineCallbacks
    def _make_source(self):
        config = self.config
        if config.fixed_backend:
            log.info(
                "Proxying to the fixed backend {url}; no cloud calls are made",
                url=config.backend_url,
            )
            self.metrics.phase_changed("ready", "ready")
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
            on_call_ended=self.metrics.api_call_ended,
            retry_policy=RetryPolicy(
                attempts=config.api_retries,
                initial_delay=config.api_retry_delay,
                max_delay=config.api_retry_max_delay,
            ),
        )
        self.cloud.start()
        provisioner = ExoscaleProvisioner(
            self.cloud,
            self._clock,
            config,
            json_fetcher(self._agent, self._clock, timeout=10),
            self.catalog,
            keyring=self._make_keyring(),
        )
        self.provisioner = provisioner
        self.metrics.watch_instance(lambda: provisioner.instance_state == "running")
        self.lifecycle = InstanceLifecycle(
            self._clock,
            provisioner,
            on_ready=lambda backend: self.activity.touch(),
            on_phase=self._phase_changed,
            retry_delay=RetryPolicy(
                initial_delay=config.run_retry_delay,
                max_delay=config.run_retry_max_delay,
            ).delay,
            may_be_running=provisioner.may_be_running,
            max_uptime=config.max_instance_hours * 3600,
            on_demand=self.activity.touch,
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

    def _make_keyring(self) -> BackendKeyring:
        state_dir = self.config.state_dir
        if state_dir is None:
            # The simulated cloud lives in memory, so its key material need not
            # outlive the daemon.
            state_dir = tempfile.mkdtemp(prefix="exoproxy-simulated-")
            self._temporary_state_dir = state_dir
        store = MaterialStore(Path(state_dir))
        store.prepare()
        log.info(
            "Keeping the key material of the instance in {directory}",
            directory=str(store.directory),
        )
        return BackendKeyring(
            store, self.backend_tls, self.config.instance_name, self._clock
        )

    def _status(self, source: BackendSource) -> dict[str, Any]:
        status = build_status(self, source)
        status["client_authentication"] = bool(self.config.client_tokens)
        if not self.config.fixed_backend:
            status["backend_tls"] = self.backend_tls.status()
        return status

    def _backend_failed(self, url: str, reason: str) -> None:
        if self.lifecycle is not None:
            self.lifecycle.backend_failed(url, reason)

    def _check_idle(self) -> None:
        if self.activity.idle_for() >= self.config.idle_timeout:
            self.lifecycle.inputs.idle_expired()

    @inlineCallbacks
    def stopService(self):
        log.info("exoproxy is stopping")
        self._notifier.stopping()
        if self._idle_loop.running:
            self._idle_loop.stop()
        stopping = [port.stopListening() for port in self._ports + self.metrics_ports]
        self._ports = []
        self.metrics_ports = []
        yield DeferredList(stopping)
        if self.lifecycle is not None:
            yield shut_down_instance(
                config=self.config,
                clock=self._clock,
                lifecycle=self.lifecycle,
                provisioner=self.provisioner,
                cloud=self.cloud,
                activity=self.activity,
            )
        yield self._pool.closeCachedConnections()
        if self.cloud is not None:
            # Joining the pool's threads waits for calls in progress, which end
            # within the API timeout; a reactor thread does the waiting.
            yield deferToThread(self.cloud.stop)
        if self._temporary_state_dir is not None:
            shutil.rmtree(self._temporary_state_dir, ignore_errors=True)
            self._temporary_state_dir = None
        yield super().stopService()
        self._notifier.close()
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
