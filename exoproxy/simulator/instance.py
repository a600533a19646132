"""
One simulated compute instance: its state machine, its boot and its Ollama server.

The API actions and the timed transitions are declared once, in `_ACTIONS` and
`_SETTLING`. Entering `running` starts the simulated cloud-init, which after the boot
delay starts the Ollama server that the user-data configures and then pulls its
models. When the user-data puts a TLS terminator in front of Ollama, the server
listens only behind it, with TLS and the bearer check. Leaving `running` closes that
server and breaks its connections.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from exoproxy.simulator.cloud_init import SimulatedBoot
from exoproxy.simulator.faults import InstanceFaults
from exoproxy.simulator.listener import LoopbackListener
from exoproxy.simulator.models import ModelStore
from exoproxy.simulator.ollama import OllamaResource
from exoproxy.simulator.terminator import BearerGuard
from exoproxy.simulator.timers import SimulatorTimings, TimerSet

log = Logger()


class InstanceState(str, enum.Enum):
    """
    The instance states of the Exoscale API that the simulator uses.
    """

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    # Entered only through fault injection; see exoproxy.simulator.faults.
    ERROR = "error"


_ALIVE = (
    InstanceState.STARTING,
    InstanceState.RUNNING,
    InstanceState.STOPPING,
    InstanceState.STOPPED,
    InstanceState.ERROR,
)

# Each API action, with the states that accept it and the state it moves to.
_ACTIONS: dict[str, dict[InstanceState, InstanceState]] = {
    "start": {InstanceState.STOPPED: InstanceState.STARTING},
    "stop": {InstanceState.RUNNING: InstanceState.STOPPING},
    "delete": {state: InstanceState.DESTROYING for state in _ALIVE},
}

# Each transient state, with the `SimulatorTimings` field that it lasts for and the
# state that follows it.
_SETTLING: dict[InstanceState, tuple[str, InstanceState]] = {
    InstanceState.STARTING: ("start_delay", InstanceState.RUNNING),
    InstanceState.STOPPING: ("stop_delay", InstanceState.STOPPED),
    InstanceState.DESTROYING: ("operation_delay", InstanceState.DESTROYED),
}


class InvalidTransition(Exception):
    """
    An API action that the instance's current state does not accept.
    """


class InstanceHost(Protocol):
    """
    The zone that an instance belongs to.
    """

    reactor: Any
    clock: IReactorTime
    timings: SimulatorTimings
    new_ip_on_start: bool

    def reassign_public_ip(self, instance: SimulatedInstance) -> str | None:
        """
        Allocate a new public IP for `instance`, which starts from `stopped`.
        """

    def instance_destroyed(self, instance: SimulatedInstance) -> None:
        """
        Forget `instance`, which has finished destroying, and free its public IP.
        """


class SimulatedInstance:
    """
    A simulated compute instance.

    Args:
        host: The zone that runs the instance.
        attributes: The API fields that the instance keeps as created:
            `id`, `name`, `created-at`, `labels`, `disk-size`, `instance-type`,
            `template`, `security-groups`, `ssh-keys`, `mac-address` and optionally
            `user-data`.
        public_ip: The public IPv4 address, or None when none is assigned.
        boot: What the user-data starts once the instance is running.
        auto_start: Start at creation, as the API's `auto-start` does by default.
        faults: The injected faults that the instance acts out; none by default.
    """

    def __init__(
        self,
        host: InstanceHost,
        attributes: dict[str, Any],
        public_ip: str | None,
        boot: SimulatedBoot,
        auto_start: bool = True,
        faults: InstanceFaults | None = None,
    ) -> None:
        self.id: str = attributes["id"]
        self.attributes = attributes
        self.public_ip = public_ip
        self.boot = boot
        self.store = ModelStore()
        self.state = InstanceState.STOPPED

        self._host = host
        self._timers = TimerSet(host.clock)
        self._settle_timer: IDelayedCall | None = None
        self._ollama: LoopbackListener | None = None
        self._ollama_port: int | None = None
        self._closing: list[Deferred[None]] = []
        # The bearer check of the running terminator, which counts its requests.
        self.terminator_guard: BearerGuard | None = None
        self.faults = faults if faults is not None else InstanceFaults()

        if auto_start:
            self._enter(InstanceState.STARTING)

    @property
    def ollama_port(self) -> int | None:
        """
        The port that the simulated Ollama server listens on, or None when it does
        not listen. It differs from `boot.port` only when that is 0.
        """
        return self._ollama_port

    def apply(self, action: str) -> None:
        """
        Apply the API action `start`, `stop` or `delete`.

        Raises:
            InvalidTransition: The current state does not accept `action`.
        """
        next_state = _ACTIONS[action].get(self.state)
        if next_state is None:
            raise InvalidTransition(
                f"Cannot {action} instance {self.id} while it is {self.state.value}"
            )

        if action == "start" and self._host.new_ip_on_start:
            self.public_ip = self._host.reassign_public_ip(self)
        self._enter(next_state)

    def close(self) -> Deferred[None]:
        """
        Cancel every timer and close the Ollama server, for the end of a simulation.

        Returns:
            A Deferred that fires once every Ollama connection is lost.
        """
        self._shut_down()

        closing, self._closing = self._closing, []
        pending = [deferred for deferred in closing if not deferred.called]
        if not pending:
            return succeed(None)
        return DeferredList(pending, consumeErrors=True).addCallback(lambda _: None)

    def _enter(self, state: InstanceState) -> None:
        previous, self.state = self.state, state
        log.info(
            "Simulated instance {instance_id} is {state}",
            instance_id=self.id,
            state=state.value,
            previous=previous.value,
        )

        if previous == InstanceState.RUNNING:
            self._shut_down()

        self._timers.cancel(self._settle_timer)
        self._settle_timer = None
        stuck = state == InstanceState.STARTING and self.faults.never_running
        if state in _SETTLING and not stuck:
            timing, next_state = _SETTLING[state]
            delay = getattr(self._host.timings, timing)
            self._settle_timer = self._timers.call_later(delay, self._enter, next_state)

        if state == InstanceState.RUNNING:
            self._timers.call_later(self._host.timings.boot_delay, self._finish_boot)
        elif state == InstanceState.DESTROYED:
            self._host.instance_destroyed(self)

    def _shut_down(self) -> None:
        """
        Cancel every pending timer, such as boot steps, and close the Ollama server.
        """
        self._timers.cancel_all()
        self._settle_timer = None
        self._stop_ollama()

    def _finish_boot(self) -> None:
        if self.faults.ollama_never_listens:
            log.warn(
                "Simulated instance {instance_id} booted, but a fault keeps its "
                "Ollama from listening",
                instance_id=self.id,
            )
            return
        if self.boot.port is None:
            log.warn(
                "Simulated instance {instance_id} booted, but its user-data "
                "configures no Ollama, so none listens",
                instance_id=self.id,
            )
            return
        if self.public_ip is None:
            log.warn(
                "Simulated instance {instance_id} has no public IP, so its Ollama "
                "cannot be reached",
                instance_id=self.id,
            )
            return

        terminator = self.boot.terminator
        port = terminator.port if terminator is not None else self.boot.port
        self._start_ollama(self.public_ip, port)
        self._pull_next(list(self.boot.models))

    def _start_ollama(self, address: str, port: int) -> None:
        resource = OllamaResource(
            self._host.clock,
            self.store,
            token_interval=self._host.timings.token_interval,
            pull_delay=self._host.timings.pull_delay,
            instance_id=self.id,
        )
        resource.faults = self.faults
        resource.on_crash = self.crash_ollama
        tls = None
        terminator = self.boot.terminator
        if terminator is not None:
            self.terminator_guard = BearerGuard(resource, terminator.bearer_token)
            resource = self.terminator_guard
            tls = terminator.tls_options()
        listener = LoopbackListener(
            self._host.reactor, address, port, resource, tls=tls
        )
        self._ollama = listener

        def listening(bound_port: int) -> None:
            if self._ollama is not listener:
                return

            self._ollama_port = bound_port
            log.info(
                "Simulated Ollama of instance {instance_id} listens on "
                "{address}:{port}",
                instance_id=self.id,
                address=address,
                port=bound_port,
            )

        def failed(failure: Failure) -> None:
            log.failure(
                "Simulated Ollama of instance {instance_id} cannot listen on "
                "{address}:{port}",
                failure,
                instance_id=self.id,
                address=address,
                port=port,
            )
            if self._ollama is listener:
                self._ollama = None

        listener.listen().addCallbacks(listening, failed)

    def _stop_ollama(self) -> None:
        if self._ollama is None:
            return

        listener, self._ollama = self._ollama, None
        self._ollama_port = None
        self._closing = [deferred for deferred in self._closing if not deferred.called]
        self._closing.append(listener.close())
        log.info(
            "Simulated Ollama of instance {instance_id} stopped listening",
            instance_id=self.id,
        )

    def _pull_next(self, models: list[str]) -> None:
        """
        Pull `models` one after the other, as the `runcmd` of cloud-init does.
        """
        while models and self.store.find(models[0]) is not None:
            models.pop(0)
        if not models:
            return

        if self.faults.pull_never_finishes:
            log.warn(
                "Simulated instance {instance_id} never finishes pulling {model}, "
                "because of a fault",
                instance_id=self.id,
                model=models[0],
            )
            return
        model = models.pop(0)

        def pulled() -> None:
            record = self.store.add(model, self._host.clock.seconds())
            log.info(
                "Simulated instance {instance_id} pulled model {model}",
                instance_id=self.id,
                model=record.name,
            )
            self._pull_next(models)

        self._timers.call_later(self._host.timings.pull_delay, pulled)

    def break_down(self) -> None:
        """
        Put the instance in state error, as a failed host would; Ollama stops.
        """
        self._enter(InstanceState.ERROR)

    def lose_public_ip(self) -> None:
        """
        Take the public IP away; the Ollama server that listened on it stops.
        """
        self.public_ip = None
        self._stop_ollama()

    def crash_ollama(self) -> None:
        """
        Stop the Ollama server at once, breaking its connections, and start it
        again after `faults.ollama_restart_delay` seconds when that is set.
        """
        self.faults.crash_stream_after = None
        self._stop_ollama()
        delay = self.faults.ollama_restart_delay
        if delay is not None and not self.faults.ollama_never_listens:
            self._timers.call_later(delay, self._restart_ollama)

    def _restart_ollama(self) -> None:
        if self.state == InstanceState.RUNNING and self._ollama is None:
            self._finish_boot()

    def to_api(self) -> dict[str, Any]:
        """
        Build the `instance` object of the API, as get-instance returns it.
        """
        payload: dict[str, Any] = {
            **self.attributes,
            "state": self.state.value,
            "public-ip-assignment": "inet4" if self.public_ip else "none",
            "private-networks": [],
            "elastic-ips": [],
            "snapshots": [],
            "anti-affinity-groups": [],
            "secureboot-enabled": False,
            "tpm-enabled": False,
        }
        if self.public_ip is not None:
            payload["public-ip"] = self.public_ip
        return payload
