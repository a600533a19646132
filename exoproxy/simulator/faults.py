"""
Fault injection for the simulated cloud: API calls that fail, hang or drop their
connection, operations that fail or stay pending, and instances and Ollama servers
that break.

`SimulatedCloud.faults` is the `FaultInjector` of a zone. Each fault is armed for a
number of events, or for one instance, and is used up as the events happen. The
`/_control` resource of `exoproxy.simulator.control` offers the same methods over
HTTP, for a person with curl.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator

from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request

from exoproxy.simulator.timers import TimerSet

if TYPE_CHECKING:
    from exoproxy.simulator.cloud import SimulatedCloud
    from exoproxy.simulator.instance import SimulatedInstance

log = Logger()

# What a faulty API call does: respond with an HTTP error status, respond 200 with a
# body that is not JSON, never respond, or close the connection without a response.
API_FAULT_KINDS = ("status", "malformed", "hang", "drop")

# The outcomes of a faulty asynchronous operation: state failure, or pending forever.
OPERATION_OUTCOMES = ("failure", "pending")

# The faults of an instance. The first four happen to an instance that exists, or to
# the next created one after `delay` seconds. The others are set when the next
# instance is created, or at once on an existing one.
INSTANCE_FAULT_KINDS = (
    "error",
    "lose-ip",
    "delete",
    "crash-ollama",
    "never-running",
    "ollama-never",
    "never-pull",
    "crash-stream",
)
_TIMED_KINDS = frozenset({"error", "lose-ip", "delete", "crash-ollama"})

_MALFORMED_BODY = b'{"instances": [{"id": '


class FaultError(ValueError):
    """
    A fault that cannot be armed: an unknown kind, a missing instance, a bad count.
    """


@dataclass
class ApiFault:
    """
    A fault for the next `remaining` calls of an API operation.

    Attributes:
        operation: The operation id of the API spec, such as "create-instance", or
            "*" for every operation.
        kind: One of `API_FAULT_KINDS`.
        remaining: How many more calls get the fault.
        status: The HTTP status of kind "status".
        retry_after: The Retry-After seconds of kind "status", if any.
        after: Apply the fault after the operation has run, so that it takes
            effect and only its response is lost; before it by default.
    """

    operation: str
    kind: str
    remaining: int
    status: int = 503
    retry_after: float | None = None
    after: bool = False


@dataclass
class OperationFault:
    """
    A fault for the next `remaining` asynchronous operations that an API operation
    starts.

    Attributes:
        operation: The operation id, such as "stop-instance", or "*".
        outcome: One of `OPERATION_OUTCOMES`.
        reason: The `reason` of a failed operation; None leaves the field out, as
            the API sometimes does.
        remaining: How many more operations get the fault.
    """

    operation: str
    outcome: str
    reason: str | None
    remaining: int


@dataclass
class InstanceFaults:
    """
    The faults that one simulated instance acts out.

    Attributes:
        never_running: It stays "starting" and never becomes "running".
        ollama_never_listens: cloud-init finishes, but no Ollama listens.
        pull_never_finishes: Ollama listens, but the model never appears.
        crash_stream_after: Ollama crashes after writing this many chunks of its
            next streamed response, which breaks every connection.
        ollama_restart_delay: Seconds after a crash until Ollama listens again,
            as systemd restarts it; None keeps it down.
    """

    never_running: bool = False
    ollama_never_listens: bool = False
    pull_never_finishes: bool = False
    crash_stream_after: int | None = None
    ollama_restart_delay: float | None = None


class FaultInjector:
    """
    The armed faults of one simulated zone, and the record of what they did.

    Args:
        cloud: The zone whose calls, operations and instances get the faults.
    """

    def __init__(self, cloud: SimulatedCloud) -> None:
        self._cloud = cloud
        self._timers = TimerSet(cloud.clock)
        self._api_faults: list[ApiFault] = []
        self._operation_faults: list[OperationFault] = []
        self._next_instance = InstanceFaults()
        self._next_instance_timed: list[tuple[str, float, dict[str, Any]]] = []
        self._running_operation: str | None = None
        self._hung: list[Request] = []
        self.created_instances: list[str] = []
        self.log: list[str] = []

    def fail_calls(
        self,
        operation: str,
        kind: str = "status",
        *,
        count: int = 1,
        status: int = 503,
        retry_after: float | None = None,
        after: bool = False,
    ) -> ApiFault:
        """
        Give the next `count` calls of `operation` the fault `kind`.

        Raises:
            FaultError: The kind, the count or the status is invalid.
        """
        if kind not in API_FAULT_KINDS:
            raise FaultError(
                f"unknown API fault {kind!r}; use one of {API_FAULT_KINDS}"
            )
        if count < 1:
            raise FaultError(f"count must be at least 1, not {count}")
        if kind == "status" and not 400 <= status <= 599:
            raise FaultError(f"status must be 400 to 599, not {status}")
        fault = ApiFault(operation, kind, count, status, retry_after, after)
        self._api_faults.append(fault)
        return fault

    def take_api_fault(self, operation: str | None, *, after: bool) -> ApiFault | None:
        """
        Use up one call of the first fault armed for `operation` at this point
        (before or after the operation runs), and return it, or None.
        """
        for fault in self._api_faults:
            if fault.after != after or fault.operation not in (operation, "*"):
                continue
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._api_faults.remove(fault)
            self.log.append(f"{operation}: {fault.kind}")
            return fault
        return None

    def respond(self, request: Request, fault: ApiFault) -> bytes | int:
        """
        Respond to `request` as `fault` says, and return what `render` returns.
        """
        if fault.kind == "status":
            request.setResponseCode(fault.status)
            request.setHeader(b"content-type", b"application/json")
            if fault.retry_after is not None:
                request.setHeader(b"retry-after", b"%d" % round(fault.retry_after))
            message = f"Simulated fault: HTTP {fault.status}"
            return json.dumps({"message": message}).encode()
        if fault.kind == "malformed":
            request.setHeader(b"content-type", b"application/json")
            return _MALFORMED_BODY
        if fault.kind == "hang":
            # The request never gets a response, but the reactor stays free. The
            # client's timeout or the simulator's stop closes the connection.
            self._hung.append(request)
            request.notifyFinish().addBoth(lambda _: self._hung.remove(request))
            return NOT_DONE_YET
        request.transport.abortConnection()
        return NOT_DONE_YET

    def fail_operations(
        self,
        operation: str,
        *,
        outcome: str = "failure",
        reason: str | None = "Simulated operation failure",
        count: int = 1,
    ) -> OperationFault:
        """
        Make the next `count` asynchronous operations of `operation` end in
        `outcome`: "failure", with `reason` or without one when it is None, or
        "pending", which never ends.

        A create-instance that fails takes its instance away with it.

        Raises:
            FaultError: The outcome or the count is invalid.
        """
        if outcome not in OPERATION_OUTCOMES:
            raise FaultError(
                f"unknown outcome {outcome!r}; use one of {OPERATION_OUTCOMES}"
            )
        if count < 1:
            raise FaultError(f"count must be at least 1, not {count}")
        fault = OperationFault(operation, outcome, reason, count)
        self._operation_faults.append(fault)
        return fault

    @contextlib.contextmanager
    def running(self, operation: str) -> Iterator[None]:
        """
        Mark `operation` as the API operation that runs now, so that the
        asynchronous operation it starts gets its operation faults.
        """
        self._running_operation = operation
        try:
            yield
        finally:
            self._running_operation = None

    def take_operation_fault(self) -> OperationFault | None:
        """
        Use up one operation of the first fault armed for the running operation,
        and return it with the running operation as its `operation`, or None.
        """
        running = self._running_operation
        for fault in self._operation_faults:
            if fault.operation not in (running, "*"):
                continue
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._operation_faults.remove(fault)
            self.log.append(f"{running}: operation {fault.outcome}")
            return replace(fault, operation=running or "*", remaining=0)
        return None

    def operation_failed(self, fault: OperationFault, reference_id: str) -> None:
        """
        Undo what a failed operation did. Only a failed create-instance leaves
        something behind, its instance, which disappears.
        """
        if fault.operation != "create-instance":
            return
        instance = self._cloud.instances.pop(reference_id, None)
        if instance is not None:
            instance.close()

    def break_instance(
        self,
        kind: str,
        instance_id: str | None = None,
        *,
        delay: float = 0.0,
        after_chunks: int = 1,
        restart_after: float | None = None,
    ) -> None:
        """
        Act out the instance fault `kind` on the instance `instance_id`, or on the
        next instance that is created when it is None.

        Args:
            kind: One of `INSTANCE_FAULT_KINDS`.
            delay: For the next instance, the seconds after its creation at which
                "error", "lose-ip", "delete" or "crash-ollama" happens.
            after_chunks: For "crash-stream", the chunks written before the crash.
            restart_after: For "crash-ollama" and "crash-stream", the seconds
                until Ollama listens again; None keeps it down.

        Raises:
            FaultError: The kind is unknown, or the instance does not exist.
        """
        if kind not in INSTANCE_FAULT_KINDS:
            raise FaultError(
                f"unknown instance fault {kind!r}; use one of {INSTANCE_FAULT_KINDS}"
            )
        options = {"after_chunks": after_chunks, "restart_after": restart_after}
        if instance_id is None:
            self._arm_for_next_instance(kind, delay, options)
            return

        instance = self._cloud.instances.get(instance_id)
        if instance is None:
            raise FaultError(f"instance {instance_id} does not exist")
        self._apply(kind, instance, options)

    def faults_for_new_instance(self, instance_id: str) -> InstanceFaults:
        """
        Record the creation of `instance_id`, and return the faults that it acts
        out, which are then no longer armed.
        """
        self.created_instances.append(instance_id)
        faults, self._next_instance = self._next_instance, InstanceFaults()
        timed, self._next_instance_timed = self._next_instance_timed, []
        for kind, delay, options in timed:
            self._timers.call_later(
                delay, self._apply_by_id, kind, instance_id, options
            )
        return faults

    def _arm_for_next_instance(
        self, kind: str, delay: float, options: dict[str, Any]
    ) -> None:
        if kind in _TIMED_KINDS:
            self._next_instance_timed.append((kind, delay, options))
        elif kind == "never-running":
            self._next_instance.never_running = True
        elif kind == "ollama-never":
            self._next_instance.ollama_never_listens = True
        elif kind == "never-pull":
            self._next_instance.pull_never_finishes = True
        else:
            self._next_instance.crash_stream_after = options["after_chunks"]
            self._next_instance.ollama_restart_delay = options["restart_after"]

    def _apply_by_id(
        self, kind: str, instance_id: str, options: dict[str, Any]
    ) -> None:
        instance = self._cloud.instances.get(instance_id)
        if instance is not None:
            self._apply(kind, instance, options)

    def _apply(
        self, kind: str, instance: SimulatedInstance, options: dict[str, Any]
    ) -> None:
        log.info(
            "Simulated fault {kind} on instance {instance_id}",
            kind=kind,
            instance_id=instance.id,
        )
        self.log.append(f"instance {instance.id}: {kind}")
        if kind == "error":
            instance.break_down()
        elif kind == "lose-ip":
            instance.lose_public_ip()
        elif kind == "delete":
            instance.apply("delete")
        elif kind == "crash-ollama":
            instance.faults.ollama_restart_delay = options["restart_after"]
            instance.crash_ollama()
        elif kind == "never-running":
            instance.faults.never_running = True
        elif kind == "ollama-never":
            instance.faults.ollama_never_listens = True
            instance.crash_ollama()
        elif kind == "never-pull":
            instance.faults.pull_never_finishes = True
        else:
            instance.faults.crash_stream_after = options["after_chunks"]
            instance.faults.ollama_restart_delay = options["restart_after"]

    def clear(self) -> None:
        """
        Disarm every fault. Faults that instances act out already stay.
        """
        self._api_faults.clear()
        self._operation_faults.clear()
        self._next_instance = InstanceFaults()
        self._next_instance_timed.clear()
        self._timers.cancel_all()

    def close(self) -> None:
        """
        Cancel the timers of armed faults, for the end of a simulation.
        """
        self._timers.cancel_all()
        for request in list(self._hung):
            if request.transport is not None:
                request.transport.abortConnection()

    def armed(self) -> dict[str, Any]:
        """
        Describe the faults that are armed, as JSON-ready data.
        """
        return {
            "api": [asdict(fault) for fault in self._api_faults],
            "operations": [asdict(fault) for fault in self._operation_faults],
            "next_instance": asdict(self._next_instance),
            "next_instance_timed": [
                {"kind": kind, "delay": delay}
                for kind, delay, _ in self._next_instance_timed
            ],
            "hung_requests": len(self._hung),
        }

    def snapshot(self) -> dict[str, Any]:
        """
        Describe the zone for a test or a person: every API call received, every
        instance and security group, the instances ever created, and the faults.
        """
        cloud = self._cloud
        return {
            "calls": [asdict(call) for call in cloud.calls],
            "instances": [instance.to_api() for instance in cloud.instances.values()],
            "security_groups": cloud.security_groups.list(),
            "created_instances": list(self.created_instances),
            "faults": self.armed(),
            "fault_log": list(self.log),
        }
