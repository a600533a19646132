"""
The lifecycle of the managed instance as the daemon uses it: the requests and reports
that it sends to the state machine, and the state that `/status` reads.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from exoproxy.lifecycle_interfaces import Backend, Lifecycle, Provisioner, ShuttingDown
from exoproxy.lifecycle_machine import _Core, _machine_factory


def retry_backoff(attempt: int) -> float:
    """
    Return the seconds to wait after failed run number C{attempt}: 10 s, doubling up
    to 10 minutes, so that repeated requests never hammer the API.
    """
    return float(min(10 * 2 ** (attempt - 1), 600))


class InstanceLifecycle:
    """
    The lifecycle state machine of the managed instance, with what `/status` shows.
    """

    def __init__(
        self,
        clock: IReactorTime,
        provisioner: Provisioner,
        *,
        on_ready: Callable[[Backend], None] = lambda backend: None,
        on_phase: Callable[[str, str], None] = lambda state, phase: None,
        retry_delay: Callable[[int], float] = retry_backoff,
        may_be_running: Callable[[str], bool] = lambda instance_id: True,
        max_uptime: float = 0.0,
        on_demand: Callable[[], None] = lambda: None,
    ) -> None:
        """
        Args:
            on_demand: called on each demand, before the state machine gets it,
                such as to restart the idle time: a request that needs the
                instance is activity even when it gets 503.
            on_phase: called with the state and the phase after each change of
                phase, such as ("provisioning", "waiting for boot") or ("idle",
                "stopped"). It runs inside a transition, so it must not use
                demand, current_backend or state, which are inputs of the
                state machine.
            retry_delay: the seconds to wait after failed run (or failed stop)
                number N before the next one.
            may_be_running: whether an instance may still run, so that an idle
                error state stops it; false for an instance known to be stopped.
            max_uptime: seconds after which a ready instance is stopped even with
                requests in flight, counted from the start of the run that
                brought it up; 0 turns this off.
        """
        self._core = _Core(
            clock=clock,
            provisioner=provisioner,
            on_ready=on_ready,
            retry_delay=retry_delay,
            on_phase=on_phase,
            may_be_running=may_be_running,
            max_uptime=max_uptime,
            phase_started=clock.seconds(),
        )
        self._machine = _machine_factory(self._core)
        self._on_demand = on_demand

    @property
    def clock(self) -> IReactorTime:
        return self._core.clock

    @property
    def inputs(self) -> Lifecycle:
        return self._machine

    def demand(self) -> None:
        self._on_demand()
        self._machine.demand()

    def adopt(self) -> None:
        """
        Look for a running instance of this daemon and serve it, without creating
        or starting one unless a request arrives meanwhile.
        """
        self._machine.adopt()

    def backend_failed(self, url: str, reason: str) -> None:
        """
        Report that a request to the backend at C{url} failed to connect, or that
        the backend broke off a response. A report about an earlier backend is
        ignored.
        """
        backend = self.current_backend()
        if backend is not None and backend.url == url:
            self._machine.backend_lost(reason)

    def current_backend(self) -> Backend | None:
        return self._machine.current_backend()

    def wait_until_ready(self) -> Deferred[Backend]:
        """
        Return a Deferred that fires with the backend once the instance is ready,
        or fails with the reason when the provisioning run fails.

        Cancelling the Deferred stops the wait; it does not stop the run.
        """
        backend = self.current_backend()
        if backend is not None:
            return succeed(backend)

        def stop_waiting(waiter: Deferred[Backend]) -> None:
            if waiter in self._core.waiters:
                self._core.waiters.remove(waiter)

        waiter: Deferred[Backend] = Deferred(stop_waiting)
        if self._core.closing:
            waiter.errback(ShuttingDown())
            return waiter
        self._core.waiters.append(waiter)
        return waiter

    @property
    def waiting(self) -> int:
        """
        The number of requests that wait for the instance.
        """
        return len(self._core.waiters)

    @property
    def state(self) -> str:
        return self._machine.state_name()

    @property
    def phase(self) -> str:
        return self._core.phase

    @property
    def phase_started(self) -> float:
        return self._core.phase_started

    @property
    def error(self) -> str | None:
        return self._core.error

    @property
    def error_is_permanent(self) -> bool:
        """
        Whether the last error is one that no retry fixes, such as rejected
        credentials, so that an operator has to act.
        """
        return self._core.error is not None and self._core.error_is_permanent

    @property
    def retry_at(self) -> float | None:
        return self._core.retry_at if self.state == "error" else None

    @property
    def stop_retry_at(self) -> float:
        return self._core.stop_retry_at

    @property
    def instance_id(self) -> str | None:
        return self._core.known_instance_id()

    @property
    def run_started(self) -> float | None:
        return self._core.run_started

    @property
    def up_since(self) -> float | None:
        """
        The clock time from which the instance's uptime counts, while it is up.
        """
        return self._core.up_since

    @property
    def max_uptime(self) -> float:
        return self._core.max_uptime

    @property
    def stop_reason(self) -> str | None:
        """
        Why the instance is being stopped, while the state is stopping, or why it
        was stopped last: L{STOPPED_WHEN_IDLE} or L{STOPPED_FOR_UPTIME}.
        """
        if self.state == "stopping":
            return self._core.stop_reason
        return self._core.last_stop_reason

    @property
    def closing(self) -> bool:
        return self._core.closing

    def cancel(self) -> None:
        """
        Cancel the provisioning run in progress, if there is one.
        """
        if self._core.run is not None:
            self._core.run.cancel()

    def close(self) -> None:
        """
        Prepare for the daemon's shutdown: cancel the run or the stop in progress
        and the uptime guard, and fail every waiting request with L{ShuttingDown}.
        No run starts afterwards.
        """
        core = self._core
        core.closing = True
        core.restart_after_stop = False
        core.disarm_uptime_guard()
        self.cancel()
        if core.stop is not None:
            core.stop.cancel()
        core.release_waiters(Failure(ShuttingDown()))
