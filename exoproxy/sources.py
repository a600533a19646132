"""
The two places a request can go: a fixed backend, or the managed instance.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from exoproxy.config import Config
from exoproxy.gateway import BackendSource
from exoproxy.lifecycle import InstanceLifecycle
from exoproxy.lifecycle_interfaces import Backend

# Retry-After seconds by phase: estimates of how long the phase usually has left,
# so that clients that honour the header do not poll much faster than it moves.
_RETRY_AFTER = {
    "creating instance": 30,
    "starting instance": 20,
    "waiting for boot": 20,
    "waiting for ollama": 10,
    "pulling model": 10,
}
_DEFAULT_RETRY_AFTER = 10


class FixedBackendSource(BackendSource):
    """
    A backend that is always on, given with --backend-url.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def current_backend(self) -> Backend | None:
        return self._backend

    def demand(self) -> None:
        pass

    def wait_until_ready(self) -> Deferred[Backend]:
        return succeed(self._backend)

    def unavailable(self) -> tuple[str, dict[str, Any], int]:
        raise AssertionError("a fixed backend is always available")


class LifecycleSource(BackendSource):
    """
    The managed instance, brought up on demand by its lifecycle.
    """

    stops_when_idle = True

    def __init__(self, lifecycle: InstanceLifecycle, config: Config) -> None:
        self.lifecycle = lifecycle
        self._config = config

    def current_backend(self) -> Backend | None:
        return self.lifecycle.current_backend()

    def demand(self) -> None:
        self.lifecycle.demand()

    def wait_until_ready(self) -> Deferred[Backend]:
        return self.lifecycle.wait_until_ready()

    def unavailable(self) -> tuple[str, dict[str, Any], int]:
        lifecycle = self.lifecycle
        if lifecycle.state == "error":
            now = lifecycle.clock.seconds()
            retry_after = max(1, round((lifecycle.retry_at or now) - now))
            return (
                f"the GPU instance failed to start: {lifecycle.error}",
                {"provisioning": False, "status": "error"},
                retry_after,
            )

        retry_after = _RETRY_AFTER.get(lifecycle.phase, _DEFAULT_RETRY_AFTER)
        return (
            f"the GPU instance is starting ({lifecycle.phase}); retry in "
            f"{retry_after} s",
            {"provisioning": True, "status": "provisioning"},
            retry_after,
        )
