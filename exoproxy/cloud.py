"""
Exoscale API calls for the reactor: every SDK call runs in a thread pool that the
daemon owns, with a timeout, transient failures are retried with backoff, and
asynchronous operations are polled on the clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from exoproxy.api_errors import ApiCallFailed
from exoproxy.sdk_runner import SdkRunner

log = Logger()

MANAGED_BY_LABEL = "managed-by"
MANAGED_BY_VALUE = "exoproxy"


class OperationFailed(Exception):
    """
    An asynchronous Exoscale operation ended in a state other than success.
    """


class OperationTimedOut(OperationFailed):
    """
    An asynchronous Exoscale operation was still pending when the wait for it
    ended.
    """


class InstanceGone(LookupError):
    """
    The API does not know the instance (404): it was deleted.
    """

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id} no longer exists")
        self.instance_id = instance_id


def labels_filter(labels: dict[str, str]) -> str:
    """
    Format labels for the `labels` query parameter of list-instances.
    """
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def has_labels(resource: dict[str, Any], labels: dict[str, str]) -> bool:
    found = resource.get("labels") or {}
    return all(found.get(key) == value for key, value in labels.items())


class ExoscaleCloud(SdkRunner):
    """
    The Exoscale API of one zone, called through the official SDK.

    Every method returns a Deferred and never blocks the reactor. The thread pool
    starts with L{start} and must be stopped with L{stop}, after L{drain}.
    """

    @inlineCallbacks
    def wait_for_operation(
        self, operation: dict[str, Any], timeout: float | None = None
    ):
        """
        Poll an operation until it succeeds, and return its final form.

        Args:
            timeout: seconds after which a pending operation is an error; None
                waits until the caller cancels.

        Raises:
            OperationFailed: the operation ended in failure or timeout, or the
                API does not find it (404).
            OperationTimedOut: the operation was still pending after C{timeout}.
        """
        # The polls are a loop of cancellable steps, not a LoopingCall, whose
        # Deferred has no canceller: a cancelled run would leave it polling.
        result: dict[str, Any] = operation
        deadline = None if timeout is None else self._clock.seconds() + timeout
        while result.get("state") == "pending":
            if deadline is not None and self._clock.seconds() >= deadline:
                raise OperationTimedOut(
                    f"Exoscale operation {operation['id']} was still pending after "
                    f"{timeout:.0f} s"
                )
            yield deferLater(self._clock, self._poll_interval, lambda: None)
            try:
                result = yield self.call("get_operation", id=operation["id"])
            except ApiCallFailed as error:
                if error.status != 404:
                    raise
                raise OperationFailed(
                    f"Exoscale operation {operation['id']} is unknown to the API"
                ) from None

        state = result.get("state")
        if state != "success":
            # The API omits the reason of some failures; the SDK's own Client.wait
            # raises KeyError then, which is why it is not used here.
            reason = result.get("reason") or "no reason given"
            raise OperationFailed(
                f"Exoscale operation {operation['id']} ended in {state}: {reason}"
            )
        return result

    @inlineCallbacks
    def wait_for_instance_state(self, instance_id: str, states: set[str]):
        """
        Poll an instance until its state is one of C{states}, and return it.

        Raises:
            InstanceGone: the API does not know the instance.
        """
        while True:
            instance = yield self.get_instance(instance_id)
            if instance.get("state") in states:
                return instance
            yield deferLater(self._clock, self._poll_interval, lambda: None)

    @inlineCallbacks
    def get_instance(self, instance_id: str):
        """
        Return the instance with this id.

        Raises:
            InstanceGone: the API does not know the instance.
        """
        try:
            instance = yield self.call("get_instance", id=instance_id)
        except ApiCallFailed as error:
            if error.status != 404:
                raise
            raise InstanceGone(instance_id) from None
        return instance

    @inlineCallbacks
    def list_managed_instances(self, labels: dict[str, str]):
        """
        Return the instances that carry all of C{labels}.

        The labels are checked again here, so that an API that ignored the filter
        could never make exoproxy act on somebody else's instance.
        """
        found = yield self.call("list_instances", labels=labels_filter(labels))
        return [
            instance
            for instance in found.get("instances", [])
            if has_labels(instance, labels)
        ]

    @inlineCallbacks
    def find_template_id(self, name: str):
        """
        Return the id of the public template with this name.

        Raises:
            LookupError: no public template has that name.
        """
        found = yield self.call("list_templates", visibility="public")
        matches = [t for t in found.get("templates", []) if t.get("name") == name]
        if not matches:
            raise LookupError(f"no public template is named {name!r} in this zone")
        # Exoscale keeps older builds under the same name; the newest comes last.
        matches.sort(key=lambda template: template.get("created-at", ""))
        return matches[-1]["id"]

    @inlineCallbacks
    def find_instance_type_id(self, family: str, size: str):
        """
        Return the id of the instance type FAMILY.SIZE.

        Raises:
            LookupError: the zone has no such instance type.
        """
        found = yield self.call("list_instance_types")
        for instance_type in found.get("instance-types", []):
            if (instance_type.get("family"), instance_type.get("size")) == (
                family,
                size,
            ):
                return instance_type["id"]
        raise LookupError(f"the zone offers no instance type {family}.{size}")

    @inlineCallbacks
    def ensure_security_group(self, name: str, port: int, networks: tuple[str, ...]):
        """
        Return the id of the security group with this name, creating it with one
        TCP ingress rule on C{port} for each network when it does not exist.
        """
        group_id = yield self._find_security_group(name)
        if group_id is not None:
            return group_id

        group_id = yield self._create_security_group(name)
        if group_id is None:
            # Another client created the group meanwhile, with its own rules.
            group_id = yield self._find_security_group(name)
            return group_id
        log.info(
            "Created security group {group_id} named {name}",
            group_id=group_id,
            name=name,
        )

        for network in networks:
            operation = yield self.call(
                "add_rule_to_security_group",
                id=group_id,
                flow_direction="ingress",
                protocol="tcp",
                network=network,
                start_port=port,
                end_port=port,
                description="Ollama for exoproxy",
            )
            yield self.wait_for_operation(operation)
        return group_id

    @inlineCallbacks
    def _find_security_group(self, name: str):
        found = yield self.call("list_security_groups")
        for group in found.get("security-groups", []):
            if group.get("name") == name:
                return group["id"]
        return None

    @inlineCallbacks
    def _create_security_group(self, name: str):
        """
        Create the security group and return its id, or None when the API rejects
        the name as taken (409).

        A failure that the API may have carried out is followed by a look for the
        group before the next attempt, so that a retry never creates a second
        group of the same name.
        """
        policy = self._retry_policy
        for attempt in range(1, policy.attempts + 1):
            try:
                operation = yield self.call(
                    "create_security_group",
                    name=name,
                    description="Ollama backend of exoproxy",
                )
            except ApiCallFailed as error:
                if error.status == 409:
                    return None
                if not (error.maybe_applied and attempt < policy.attempts):
                    raise
                delay = policy.delay(attempt, error.retry_after)
                log.warn(
                    "{operation} may have been carried out although it failed "
                    "({error}); looking for the group in {delay:.1f} s",
                    operation="create-security-group",
                    error=error.detail,
                    delay=delay,
                )
                yield deferLater(self._clock, delay, lambda: None)
                group_id = yield self._find_security_group(name)
                if group_id is not None:
                    return group_id
                continue
            operation = yield self.wait_for_operation(operation)
            return operation["reference"]["id"]
        raise AssertionError("the loop returns or raises on its last attempt")
