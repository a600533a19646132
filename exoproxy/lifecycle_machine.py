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
from typing import Any, Callable

from automat import TypeMachineBuilder, pep614
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from exoproxy.api_errors import ApiCallFailed
from exoproxy.lifecycle_interfaces import (
    STOPPED_FOR_UPTIME,
    STOPPED_WHEN_IDLE,
    Backend,
    Lifecycle,
    Provisioner,
    ShuttingDown,
)


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
        # The provisioner drops the id of a destroyed instance, so the next run
        # creates a new one and the phase is "idle" rather than "stopped".
        core.instance_id = core.provisioner.known_instance_id()
        core.set_phase("stopped" if core.instance_id else "idle", "idle")
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
