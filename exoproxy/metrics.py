"""
The daemon's Prometheus metrics, served at `/metrics` in the text format by
prometheus_client's Twisted resource.

Each daemon has its own CollectorRegistry, so several daemons in one process (as in
the tests) keep separate counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from twisted.internet.interfaces import IReactorTime
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from exoproxy.routes import ROUTES

INSTANCE_STATES = ("idle", "provisioning", "ready", "stopping", "error")

# A cold start takes from a few seconds (a running instance is found) to tens of
# minutes (a new GPU instance installs its driver and pulls a model of many GiB).
TIME_TO_READY_BUCKETS = (
    5,
    15,
    30,
    60,
    120,
    180,
    300,
    450,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
    float("inf"),
)

_LOCAL_PATHS = frozenset({"/", "/status", "/metrics"})


def _route_name(pattern: str) -> str:
    # "^/api/blobs/sha256[:-][0-9a-fA-F]{64}$" becomes "/api/blobs/*": a segment
    # that is a regular expression stands for many paths.
    segments = pattern.removeprefix("^").removesuffix("$").split("/")
    return "/".join(
        "*" if re.search(r"[\[\](){}+*?\\|]", segment) else segment
        for segment in segments
    )


_ROUTE_NAMES = tuple(
    (route.pattern, _route_name(route.pattern.pattern)) for route in ROUTES
)


def route_label(path: str) -> str:
    """
    Return the route label of a request path: the route's path, with "*" for a
    variable segment, or "unmatched". The set of labels is fixed, so a client
    cannot create new series by inventing paths.
    """
    if path in _LOCAL_PATHS:
        return path
    for pattern, name in _ROUTE_NAMES:
        if pattern.match(path):
            return name
    return "unmatched"


class _MetricsPage(Resource):
    """
    The `/metrics` page: it brings the uptime up to date in the reactor thread,
    then lets prometheus_client's resource render the registry.
    """

    isLeaf = True

    def __init__(self, metrics: DaemonMetrics, exposition: IResource) -> None:
        super().__init__()
        self._metrics = metrics
        self._exposition = exposition

    def render(self, request: Request) -> bytes | int:
        self._metrics.refresh()
        return self._exposition.render(request)


class DaemonMetrics:
    """
    The metrics of one daemon and the hooks that update them.

    The metric objects are public, so that another part of the daemon can update
    or bind one, as the service binds C{held_requests} to the gateway's count.
    Every method must be called in the reactor thread.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

        self.requests = Counter(
            "exoproxy_http_requests",
            "HTTP requests that have ended, by route and status code; a request "
            "whose connection closed before its response started has status "
            "'aborted'.",
            ["route", "status"],
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            "exoproxy_http_requests_in_flight",
            "HTTP requests received whose response has not ended.",
            registry=registry,
        )
        self.held_requests = Gauge(
            "exoproxy_held_requests",
            "Requests held until the instance is ready, instead of answered 503.",
            registry=registry,
        )
        self.time_to_ready = Histogram(
            "exoproxy_time_to_ready_seconds",
            "Seconds from the start of a provisioning run to Ollama serving the "
            "model, for each run that succeeded.",
            buckets=TIME_TO_READY_BUCKETS,
            registry=registry,
        )
        self.instance_state = Enum(
            "exoproxy_instance_state",
            "State of the managed instance's lifecycle.",
            states=list(INSTANCE_STATES),
            registry=registry,
        )
        self.instance_uptime = Counter(
            "exoproxy_instance_uptime_seconds",
            "Seconds during which the managed instance was ready or running, as "
            "last seen in the Exoscale API.",
            registry=registry,
        )
        self.api_calls = Counter(
            "exoproxy_exoscale_api_calls",
            "Exoscale API calls that have ended, by SDK operation and result "
            "(success, error or timeout).",
            ["operation", "result"],
            registry=registry,
        )
        self.upstream_bytes = Counter(
            "exoproxy_upstream_bytes",
            "Response body bytes relayed from Ollama to clients, counted when each "
            "response ends.",
            registry=registry,
        )

        self._state = "idle"
        self._instance_running: Callable[[], bool] = lambda: False
        self._run_started: float | None = None
        self._accounted_at = clock.seconds()
        self._was_up = False
        self._resource: IResource | None = None

    def watch_instance(self, instance_running: Callable[[], bool]) -> None:
        """
        Count uptime also while C{instance_running()} is true, such as while the
        instance boots and pulls the model.
        """
        self._instance_running = instance_running
        self._account()

    def phase_changed(self, state: str, phase: str) -> None:
        """
        Record a change of the lifecycle's state or phase.
        """
        now = self._clock.seconds()
        self._account()
        if state == "provisioning" and self._state != "provisioning":
            self._run_started = now
        elif state == "ready" and self._run_started is not None:
            self.time_to_ready.observe(now - self._run_started)
            self._run_started = None
        elif state != "provisioning":
            self._run_started = None

        self._state = state
        self.instance_state.state(state)
        self._was_up = self._is_up()

    def api_call_ended(self, operation: str, result: str) -> None:
        self.api_calls.labels(operation=operation, result=result).inc()

    def refresh(self) -> None:
        """
        Bring the uptime counter up to now.
        """
        self._account()

    def _is_up(self) -> bool:
        return self._state == "ready" or self._instance_running()

    def _account(self) -> None:
        # The time since the last call counts if the instance was up at the last
        # call. A change of the instance's state between two calls is only seen
        # at the second one.
        now = self._clock.seconds()
        if self._was_up and now > self._accounted_at:
            self.instance_uptime.inc(now - self._accounted_at)
        self._accounted_at = now
        self._was_up = self._is_up()

    @property
    def resource(self) -> IResource:
        """
        The resource that renders these metrics, for a `/metrics` path.
        """
        if self._resource is None:
            # prometheus_client.twisted imports the global reactor, so it is
            # imported only once a reactor runs the daemon. Its resource renders
            # in the reactor's thread pool.
            from prometheus_client.twisted import MetricsResource

            self._resource = _MetricsPage(self, MetricsResource(self.registry))
        return self._resource

    def site_root(self) -> IResource:
        """
        Return a root resource that serves only `/metrics`, for --metrics-listen.
        """
        return _MetricsOnly(self.resource)


class _MetricsOnly(Resource):
    """
    The root of a metrics listener: `/metrics`, and 404 for every other path.
    """

    def __init__(self, page: IResource) -> None:
        super().__init__()
        self.putChild(b"metrics", page)

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()
