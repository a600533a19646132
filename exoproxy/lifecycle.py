"""
The provisioning lifecycle of the managed instance, as one state machine.

The states are idle, provisioning, ready, stopping and error. In idle, no instance
serves. In provisioning, a run finds, starts or creates the instance and waits until
Ollama serves the model, or checks a backend that failed. In ready, Ollama on the
instance serves the model. In stopping, the instance is being stopped or destroyed.
In error, the last run or stop failed, and a later request retries after a backoff.
Every transition is declared in L{_build_machine}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import attrs
from automat import TypeMachineBuilder, pep614
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from exoproxy.api_errors import ApiCallFailed

# The reasons for a stop, as `/status` shows them.
STOPPED_WHEN_IDLE = "idle"
STOPPED_FOR_UPTIME = "max-instance-hours"


@attrs.frozen
class Backend:
    """
    An Ollama server that is ready to take requests.
    """

    url: str
    instance_id: str | None = None


class ShuttingDown(Exception):
    """
    The daemon is shutting down, so no instance is brought up any more.
    """

    def __init__(self) -> None:
        super().__init__("exoproxy is shutting down")


class Provisioner(Protocol):
    def bring_up(
        self,
        set_phase: Callable[[str], None],
        needed: Callable[[], bool] | None = None,
        previous: Backend | None = None,
    ) -> Deferred[Backend | None]:
        """
        Find, start or create the instance and wait until Ollama serves the model.

        While C{needed()} is false, only adopt a running instance, and fire with
        None when there is none. When C{previous} still responds, fire with it.
        """

    def shut_down(self, instance_id: str) -> Deferred[None]:
        """
        Stop or destroy the instance, as the idle action selects.
        """

    def known_instance_id(self) -> str | None:
        """
        Return the id of the instance that the last run found or created.
        """


class Lifecycle(Protocol):
    def demand(self) -> None:
        "A request needs the instance."

    def adopt(self) -> None:
        "The daemon has started, and a running instance of its own may exist."

    def retry(self) -> None:
        "The backoff after a failed run has passed and a request needs the instance."

    def instance_ready(self, backend: Backend) -> None:
        "Ollama on the instance answers and lists the model."

    def nothing_to_adopt(self) -> None:
        "The run found no running instance, and no request needs one."

    def provisioning_failed(self, failure: Failure) -> None:
        "The provisioning run failed."

    def backend_lost(self, reason: str) -> None:
        "A request could not connect to the backend, or it broke off a response."

    def idle_expired(self) -> None:
        "No request has been in flight for the idle timeout."

    def stop_retry_due(self) -> None:
        "In error, the idle timeout and the backoff after a failed stop have passed."

    def uptime_exceeded(self) -> None:
        "The instance has been up for the maximum uptime."

    def stop_finished(self) -> None:
        "The instance has stopped or been destroyed."

    def stop_failed(self, failure: Failure) -> None:
        "Stopping or destroying the instance failed."

    def state_name(self) -> str:
        "The name of the current state."

    def current_backend(self) -> Backend | None:
        "The backend to proxy to, when the state is ready."


@dataclass
class _Core:
    """
    The state shared by all states: the clock, the provisioner and the record of
    what happened, which `/status` reads.
    """

    clock: IReactorTime
    provisioner: Provisioner
    on_ready: Callable[[Backend], None]
    retry_delay: Callable[[int], float]
    # Called with the state and the new phase after each change of phase, from
    # inside a transition, so it must not send the state machine an input.
    on_phase: Callable[[str, str], None] = lambda state, phase: None
    may_be_running: Callable[[str], bool] = lambda instance_id: True
    max_uptime: float = 0.0
    log: Logger = field(default_factory=Logger)

    phase: str = "idle"
    phase_started: float = 0.0
    error: str | None = None
    error_is_permanent: bool = False
    failed_attempts: int = 0
    retry_at: float = 0.0
    stop_failures: int = 0
    stop_retry_at: float = 0.0
    restart_after_stop: bool = False
    demanded: bool = False
    closing: bool = False
    instance_id: str | None = None
    backend: Backend | None = None
    run: Deferred[Any] | None = None
    stop: Deferred[Any] | None = None
    run_started: float | None = None
    up_since: float | None = None
    uptime_timer: IDelayedCall | None = None
    stop_reason: str | None = None
    last_stop_reason: str | None = None
    waiters: list[Deferred[Backend]] = field(default_factory=list)

    def release_waiters(self, result: Backend | Failure) -> None:
        """
        Fire the Deferreds of the requests that wait for the instance, on the next
        reactor turn.

        Transitions call this, and a waiter's callbacks read the lifecycle's state,
        which Automat does not allow while a transition runs.
        """
        self.waiters, waiting = [], self.waiters

        def fire() -> None:
            for waiter in waiting:
                if not waiter.called:
                    waiter.callback(result)

        if waiting:
            self.clock.callLater(0, fire)

    def set_phase(self, phase: str, state: str = "provisioning") -> None:
        """
        Record a new phase of C{state}; the provisioner only sets phases of a
        provisioning run.
        """
        if phase == self.phase:
            return
        now = self.clock.seconds()
        self.log.info(
            "Instance {instance_id}: {phase} (previous phase {previous} took "
            "{duration:.1f} s)",
            instance_id=self.known_instance_id() or "(not known yet)",
            phase=phase,
            previous=self.phase,
            duration=now - self.phase_started,
        )
        self.phase = phase
        self.phase_started = now
        self.on_phase(state, phase)

    def known_instance_id(self) -> str | None:
        return self.instance_id or self.provisioner.known_instance_id()

    def launch(self, lifecycle: Lifecycle, run: Deferred[Backend | None]) -> None:
        """
        Make C{run} the provisioning run, whose result is the next input.
        """
        now = self.clock.seconds()
        self.run = run
        self.run_started = now
        if self.up_since is None:
            self.up_since = now

        def ended(backend: Backend | None) -> None:
            if backend is None:
                lifecycle.nothing_to_adopt()
            else:
                lifecycle.instance_ready(backend)

        run.addCallbacks(ended, lifecycle.provisioning_failed)

    def arm_uptime_guard(self, lifecycle: Lifecycle) -> None:
        if self.max_uptime <= 0 or self.up_since is None:
            return
        remaining = self.up_since + self.max_uptime - self.clock.seconds()
        self.uptime_timer = self.clock.callLater(
            max(remaining, 0.0), lifecycle.uptime_exceeded
        )

    def disarm_uptime_guard(self) -> None:
        if self.uptime_timer is not None and self.uptime_timer.active():
            self.uptime_timer.cancel()
        self.uptime_timer = None


def _begin_stop(lifecycle: Lifecycle, core: _Core, reason: str) -> None:
    instance_id = core.known_instance_id()
    core.backend = None
    core.restart_after_stop = False
    core.stop_reason = reason
    core.disarm_uptime_guard()
    if instance_id is None or not core.may_be_running(instance_id):
        # Nothing runs, so nothing is stopped; the state still goes to idle.
        core.stop_reason = None
        core.clock.callLater(0, lifecycle.stop_finished)
        return
    if reason == STOPPED_FOR_UPTIME:
        core.log.warn(
            "Instance {instance_id} has been up for {hours:.2f} h "
            "(--max-instance-hours); shutting it down, also if requests are in "
            "flight",
            instance_id=instance_id,
            hours=(core.clock.seconds() - (core.up_since or 0)) / 3600,
        )
    else:
        core.log.info(
            "Instance {instance_id} is idle; shutting it down",
            instance_id=instance_id,
        )
    core.set_phase("stopping", "stopping")
    core.stop = core.provisioner.shut_down(instance_id)
    core.stop.addCallbacks(lambda _: lifecycle.stop_finished(), lifecycle.stop_failed)


def _build_machine() -> Callable[[_Core], Lifecycle]:
    machine = TypeMachineBuilder(Lifecycle, _Core)
    idle = machine.state("idle")
    provisioning = machine.state("provisioning")
    ready = machine.state("ready")
    stopping = machine.state("stopping")
    error = machine.state("error")

    for state, name in (
        (idle, "idle"),
        (provisioning, "provisioning"),
        (ready, "ready"),
        (stopping, "stopping"),
        (error, "error"),
    ):
        state.upon(Lifecycle.state_name).loop().returns(name)

    idle.upon(Lifecycle.current_backend).loop().returns(None)
    provisioning.upon(Lifecycle.current_backend).loop().returns(None)
    stopping.upon(Lifecycle.current_backend).loop().returns(None)
    error.upon(Lifecycle.current_backend).loop().returns(None)

    # Adoption happens once, at startup; later runs find the instance anyway.
    provisioning.upon(Lifecycle.adopt).loop().returns(None)
    ready.upon(Lifecycle.adopt).loop().returns(None)
    stopping.upon(Lifecycle.adopt).loop().returns(None)
    error.upon(Lifecycle.adopt).loop().returns(None)

    ready.upon(Lifecycle.demand).loop().returns(None)

    # Nothing is stopped while it is being brought up or is already going.
    idle.upon(Lifecycle.idle_expired).loop().returns(None)
    provisioning.upon(Lifecycle.idle_expired).loop().returns(None)
    stopping.upon(Lifecycle.idle_expired).loop().returns(None)

    # Only a ready backend can be lost; a run checks its backend itself.
    idle.upon(Lifecycle.backend_lost).loop().returns(None)
    provisioning.upon(Lifecycle.backend_lost).loop().returns(None)
    stopping.upon(Lifecycle.backend_lost).loop().returns(None)
    error.upon(Lifecycle.backend_lost).loop().returns(None)

    # The uptime guard runs only while ready; a late timer is ignored.
    idle.upon(Lifecycle.uptime_exceeded).loop().returns(None)
    provisioning.upon(Lifecycle.uptime_exceeded).loop().returns(None)
    stopping.upon(Lifecycle.uptime_exceeded).loop().returns(None)
    error.upon(Lifecycle.uptime_exceeded).loop().returns(None)

    @pep614(idle.upon(Lifecycle.demand).to(provisioning))
    @pep614(error.upon(Lifecycle.retry).to(provisioning))
    def start_run(lifecycle: Lifecycle, core: _Core) -> None:
        core.error = None
        core.demanded = True
        if core.closing:
            core.launch(lifecycle, _failed_run())
            return
        core.launch(lifecycle, core.provisioner.bring_up(core.set_phase))

    @pep614(idle.upon(Lifecycle.adopt).to(provisioning))
    def start_adoption(lifecycle: Lifecycle, core: _Core) -> None:
        core.error = None
        core.demanded = False
        run = core.provisioner.bring_up(core.set_phase, needed=lambda: core.demanded)
        core.launch(lifecycle, run)

    @pep614(provisioning.upon(Lifecycle.demand).loop())
    def demand_while_provisioning(lifecycle: Lifecycle, core: _Core) -> None:
        core.demanded = True

    @pep614(ready.upon(Lifecycle.current_backend).loop())
    def serving_backend(lifecycle: Lifecycle, core: _Core) -> Backend | None:
        return core.backend

    @pep614(provisioning.upon(Lifecycle.instance_ready).to(ready))
    def became_ready(lifecycle: Lifecycle, core: _Core, backend: Backend) -> None:
        core.run = None
        core.failed_attempts = 0
        core.backend = backend
        core.instance_id = backend.instance_id
        core.set_phase("ready", "ready")
        core.on_ready(backend)
        core.release_waiters(backend)
        core.arm_uptime_guard(lifecycle)

    @pep614(provisioning.upon(Lifecycle.nothing_to_adopt).to(idle))
    def found_nothing(lifecycle: Lifecycle, core: _Core) -> None:
        core.run = None
        core.up_since = None
        core.instance_id = core.provisioner.known_instance_id()
        core.set_phase("stopped" if core.instance_id else "idle", "idle")
        core.release_waiters(Failure(LookupError("no instance is running")))

    @pep614(provisioning.upon(Lifecycle.provisioning_failed).to(error))
    def run_failed(lifecycle: Lifecycle, core: _Core, failure: Failure) -> None:
        core.run = None
        core.instance_id = core.provisioner.known_instance_id()
        if core.instance_id is None or not core.may_be_running(core.instance_id):
            core.up_since = None
        if core.closing:
            core.error = str(ShuttingDown())
            core.set_phase("error", "error")
            core.release_waiters(Failure(ShuttingDown()))
            return

        core.failed_attempts += 1
        delay = core.retry_delay(core.failed_attempts)
        core.retry_at = core.clock.seconds() + delay
        if failure.check(CancelledError):
            core.error = "the provisioning run was cancelled"
        else:
            core.error = failure.getErrorMessage() or failure.type.__name__
        core.error_is_permanent = bool(
            failure.check(ApiCallFailed) and not failure.value.transient
        )
        core.log.error(
            "Provisioning instance {instance_id} failed (attempt {attempt}): "
            "{error}; a request after {delay:.0f} s retries",
            instance_id=core.instance_id,
            attempt=core.failed_attempts,
            error=core.error,
            delay=delay,
        )
        core.set_phase("error", "error")
        core.release_waiters(failure)

    @pep614(error.upon(Lifecycle.demand).loop())
    def demand_in_error(lifecycle: Lifecycle, core: _Core) -> None:
        # Automat picks a transition by state and input alone, so the backoff
        # check here decides whether to send the second input, retry.
        if not core.closing and core.clock.seconds() >= core.retry_at:
            lifecycle.retry()

    @pep614(ready.upon(Lifecycle.backend_lost).to(provisioning))
    def check_backend(lifecycle: Lifecycle, core: _Core, reason: str) -> None:
        previous = core.backend
        core.backend = None
        core.demanded = False
        core.disarm_uptime_guard()
        core.log.warn(
            "The backend of instance {instance_id} failed ({reason}); checking it "
            "before the next request is proxied",
            instance_id=core.instance_id,
            reason=reason,
        )
        run = core.provisioner.bring_up(
            core.set_phase, needed=lambda: core.demanded, previous=previous
        )
        core.launch(lifecycle, run)

    @pep614(ready.upon(Lifecycle.idle_expired).to(stopping))
    @pep614(error.upon(Lifecycle.stop_retry_due).to(stopping))
    def stop_idle(lifecycle: Lifecycle, core: _Core) -> None:
        _begin_stop(lifecycle, core, STOPPED_WHEN_IDLE)

    @pep614(ready.upon(Lifecycle.uptime_exceeded).to(stopping))
    def stop_for_uptime(lifecycle: Lifecycle, core: _Core) -> None:
        core.uptime_timer = None
        _begin_stop(lifecycle, core, STOPPED_FOR_UPTIME)

    @pep614(error.upon(Lifecycle.idle_expired).loop())
    def idle_in_error(lifecycle: Lifecycle, core: _Core) -> None:
        # Like demand_in_error: the backoff after a failed stop decides whether
        # the second input, stop_retry_due, is sent.
        if core.closing:
            return
        instance_id = core.known_instance_id()
        may_run = instance_id is not None and core.may_be_running(instance_id)
        if may_run and core.clock.seconds() < core.stop_retry_at:
            return
        lifecycle.stop_retry_due()

    @pep614(stopping.upon(Lifecycle.demand).loop())
    def demand_while_stopping(lifecycle: Lifecycle, core: _Core) -> None:
        core.restart_after_stop = True

    @pep614(stopping.upon(Lifecycle.stop_finished).to(idle))
    def stopped(lifecycle: Lifecycle, core: _Core) -> None:
        core.stop = None
        core.stop_failures = 0
        core.up_since = None
        if core.stop_reason is not None:
            core.last_stop_reason = core.stop_reason
        core.set_phase("stopped" if core.known_instance_id() else "idle", "idle")
        if core.restart_after_stop and not core.closing:
            core.restart_after_stop = False
            lifecycle.demand()

    @pep614(stopping.upon(Lifecycle.stop_failed).to(error))
    def stop_went_wrong(lifecycle: Lifecycle, core: _Core, failure: Failure) -> None:
        core.stop = None
        if core.closing:
            core.error = "the stop was cancelled, because exoproxy is shutting down"
            core.set_phase("error", "error")
            return
        core.stop_failures += 1
        delay = core.retry_delay(core.stop_failures)
        now = core.clock.seconds()
        core.stop_retry_at = now + delay
        core.error = f"stopping the instance failed: {failure.getErrorMessage()}"
        core.error_is_permanent = False
        core.retry_at = now
        core.log.error(
            "Shutting down instance {instance_id} failed: {error}; trying again "
            "after {delay:.0f} s without requests",
            instance_id=core.instance_id,
            error=core.error,
            delay=delay,
        )
        core.set_phase("error", "error")
        if core.restart_after_stop and not core.closing:
            core.restart_after_stop = False
            lifecycle.demand()

    return machine.build()


def _failed_run() -> Deferred[Backend | None]:
    failed: Deferred[Backend | None] = Deferred()
    failed.errback(ShuttingDown())
    return failed


_machine_factory = _build_machine()


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
