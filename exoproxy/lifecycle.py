"""
The provisioning lifecycle of the managed instance, as one state machine.

States: idle (no instance is serving), provisioning (one run brings an instance up),
ready (Ollama on the instance serves the model), stopping (the idle instance is being
stopped or destroyed) and error (the last run failed; a later request retries after a
backoff). Every transition is declared in L{_build_machine}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import attrs
from automat import TypeMachineBuilder, pep614
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure


@attrs.frozen
class Backend:
    """
    An Ollama server that is ready to take requests.
    """

    url: str
    instance_id: str | None = None


class Provisioner(Protocol):
    def bring_up(self, set_phase: Callable[[str], None]) -> Deferred[Backend]:
        """
        Find, start or create the instance and wait until Ollama serves the model.
        """

    def shut_down(self, instance_id: str) -> Deferred[None]:
        """
        Stop or destroy the instance, as the idle action says.
        """

    def known_instance_id(self) -> str | None:
        """
        Return the id of the instance that the last run found or created.
        """


class Lifecycle(Protocol):
    def demand(self) -> None:
        "A request needs the instance."

    def retry(self) -> None:
        "The backoff after a failed run has passed and a request needs the instance."

    def instance_ready(self, backend: Backend) -> None:
        "Ollama on the instance answers and lists the model."

    def provisioning_failed(self, failure: Failure) -> None:
        "The provisioning run failed."

    def idle_expired(self) -> None:
        "No request has been in flight for the idle timeout."

    def stop_finished(self) -> None:
        "The idle instance has stopped or been destroyed."

    def stop_failed(self, failure: Failure) -> None:
        "Stopping or destroying the idle instance failed."

    def state_name(self) -> str:
        "The name of the current state."

    def current_backend(self) -> Backend | None:
        "The backend to proxy to, when the state is ready."


@dataclass
class _Core:
    """
    What the states share: the clock, the provisioner and the record of what
    happened, which `/status` reads.
    """

    clock: IReactorTime
    provisioner: Provisioner
    on_ready: Callable[[Backend], None]
    retry_delay: Callable[[int], float]
    log: Logger = field(default_factory=Logger)

    phase: str = "idle"
    phase_started: float = 0.0
    error: str | None = None
    failed_attempts: int = 0
    retry_at: float = 0.0
    restart_after_stop: bool = False
    instance_id: str | None = None
    backend: Backend | None = None
    run: Deferred[Any] | None = None
    waiters: list[Deferred[Backend]] = field(default_factory=list)

    def release_waiters(self, result: Backend | Failure) -> None:
        """
        Fire the Deferreds of the requests that wait for the instance.
        """
        self.waiters, waiting = [], self.waiters
        for waiter in waiting:
            waiter.callback(result)

    def set_phase(self, phase: str) -> None:
        if phase == self.phase:
            return
        now = self.clock.seconds()
        self.log.info(
            "Instance {instance_id}: {phase} (previous phase {previous} took "
            "{duration:.1f} s)",
            instance_id=self.instance_id
            or self.provisioner.known_instance_id()
            or "(not known yet)",
            phase=phase,
            previous=self.phase,
            duration=now - self.phase_started,
        )
        self.phase = phase
        self.phase_started = now


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

    # One provisioning run serves every request that arrives before it ends.
    provisioning.upon(Lifecycle.demand).loop().returns(None)
    ready.upon(Lifecycle.demand).loop().returns(None)

    # Nothing is stopped while it is being brought up or is already going.
    idle.upon(Lifecycle.idle_expired).loop().returns(None)
    provisioning.upon(Lifecycle.idle_expired).loop().returns(None)
    stopping.upon(Lifecycle.idle_expired).loop().returns(None)

    @pep614(idle.upon(Lifecycle.demand).to(provisioning))
    @pep614(error.upon(Lifecycle.retry).to(provisioning))
    def start_run(lifecycle: Lifecycle, core: _Core) -> None:
        core.error = None
        core.run = core.provisioner.bring_up(core.set_phase)
        core.run.addCallbacks(lifecycle.instance_ready, lifecycle.provisioning_failed)

    @pep614(ready.upon(Lifecycle.current_backend).loop())
    def serving_backend(lifecycle: Lifecycle, core: _Core) -> Backend | None:
        return core.backend

    @pep614(provisioning.upon(Lifecycle.instance_ready).to(ready))
    def became_ready(lifecycle: Lifecycle, core: _Core, backend: Backend) -> None:
        core.run = None
        core.failed_attempts = 0
        core.backend = backend
        core.instance_id = backend.instance_id
        core.set_phase("ready")
        core.on_ready(backend)
        core.release_waiters(backend)

    @pep614(provisioning.upon(Lifecycle.provisioning_failed).to(error))
    def run_failed(lifecycle: Lifecycle, core: _Core, failure: Failure) -> None:
        core.run = None
        core.instance_id = core.provisioner.known_instance_id()
        core.failed_attempts += 1
        delay = core.retry_delay(core.failed_attempts)
        core.retry_at = core.clock.seconds() + delay
        core.error = failure.getErrorMessage() or failure.type.__name__
        core.log.error(
            "Provisioning instance {instance_id} failed (attempt {attempt}): "
            "{error}; a request after {delay:.0f} s retries",
            instance_id=core.instance_id,
            attempt=core.failed_attempts,
            error=core.error,
            delay=delay,
        )
        core.set_phase("error")
        core.release_waiters(failure)

    @pep614(error.upon(Lifecycle.demand).loop())
    def demand_in_error(lifecycle: Lifecycle, core: _Core) -> None:
        # Automat picks a transition by state and input alone, so the backoff
        # check here decides whether to send the second input, retry.
        if core.clock.seconds() >= core.retry_at:
            lifecycle.retry()

    @pep614(ready.upon(Lifecycle.idle_expired).to(stopping))
    @pep614(error.upon(Lifecycle.idle_expired).to(stopping))
    def stop_idle(lifecycle: Lifecycle, core: _Core) -> None:
        instance_id = core.instance_id or core.provisioner.known_instance_id()
        core.backend = None
        core.restart_after_stop = False
        if instance_id is None:
            core.clock.callLater(0, lifecycle.stop_finished)
            return
        core.log.info(
            "Instance {instance_id} is idle; shutting it down",
            instance_id=instance_id,
        )
        core.set_phase("stopping")
        stopped = core.provisioner.shut_down(instance_id)
        stopped.addCallbacks(lambda _: lifecycle.stop_finished(), lifecycle.stop_failed)

    @pep614(stopping.upon(Lifecycle.demand).loop())
    def demand_while_stopping(lifecycle: Lifecycle, core: _Core) -> None:
        core.restart_after_stop = True

    @pep614(stopping.upon(Lifecycle.stop_finished).to(idle))
    def stopped(lifecycle: Lifecycle, core: _Core) -> None:
        core.set_phase("stopped")
        if core.restart_after_stop:
            core.restart_after_stop = False
            lifecycle.demand()

    @pep614(stopping.upon(Lifecycle.stop_failed).to(error))
    def stop_went_wrong(lifecycle: Lifecycle, core: _Core, failure: Failure) -> None:
        core.error = f"stopping the instance failed: {failure.getErrorMessage()}"
        core.retry_at = core.clock.seconds()
        core.log.error(
            "Shutting down instance {instance_id} failed: {error}",
            instance_id=core.instance_id,
            error=core.error,
        )
        core.set_phase("error")
        if core.restart_after_stop:
            core.restart_after_stop = False
            lifecycle.demand()

    return machine.build()


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
        retry_delay: Callable[[int], float] = retry_backoff,
    ) -> None:
        self._core = _Core(
            clock=clock,
            provisioner=provisioner,
            on_ready=on_ready,
            retry_delay=retry_delay,
            phase_started=clock.seconds(),
        )
        self._machine = _machine_factory(self._core)

    @property
    def clock(self) -> IReactorTime:
        return self._core.clock

    @property
    def inputs(self) -> Lifecycle:
        return self._machine

    def demand(self) -> None:
        self._machine.demand()

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
    def retry_at(self) -> float | None:
        return self._core.retry_at if self.state == "error" else None

    @property
    def instance_id(self) -> str | None:
        return self._core.instance_id or self._core.provisioner.known_instance_id()

    def cancel(self) -> None:
        """
        Cancel the provisioning run in progress, if there is one.
        """
        if self._core.run is not None:
            self._core.run.cancel()
