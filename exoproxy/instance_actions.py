"""
Stopping and deleting an instance in a cloud that other clients change too.

The instance may already be gone (404), or be in a state that rejects the action
(409), because an operator, another client or a restart got there first. Each action
here ends when the instance has reached the action's goal, however it got there.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from exoproxy.api_errors import ApiCallFailed
from exoproxy.cloud import ExoscaleCloud, InstanceGone

log = Logger()

ACTIONS = ("stop", "destroy", "keep")

# States in which an instance runs or is about to, and so costs GPU hours.
ACTIVE_STATES = frozenset({"running", "starting"})
GONE_STATES = frozenset({"destroying", "destroyed", "expunging"})
_SETTLED_STATES = frozenset({"running", "stopped", "error"}) | GONE_STATES


class ShutdownFailed(Exception):
    """
    The instance could not be stopped or deleted.
    """


class InstanceActions:
    """
    Stop or delete one instance and wait until that has happened, within a
    timeout.
    """

    def __init__(self, cloud: ExoscaleCloud, clock: IReactorTime) -> None:
        self._cloud = cloud
        self._clock = clock

    def apply(self, action: str, instance_id: str, timeout: float) -> Deferred[str]:
        """
        Stop (action "stop") or delete (action "destroy") the instance.

        Returns:
            A Deferred that fires with "stopped" or "gone".

        Raises:
            ShutdownFailed: the instance is in a state that the action cannot
                leave, such as "error" for a stop, or it did not reach the goal
                within C{timeout} seconds.
            ApiCallFailed: an API call failed, after its retries.
        """
        if action == "destroy":
            running = self._delete(instance_id)
            goal = "deleted"
        elif action == "stop":
            running = self._stop(instance_id)
            goal = "stopped"
        else:
            raise ValueError(f"unknown action {action!r}; use stop or destroy")

        def explain(result: object, seconds: float) -> object:
            raise ShutdownFailed(
                f"instance {instance_id} was not {goal} within {seconds:.0f} s "
                "(--stop-timeout)"
            )

        return running.addTimeout(timeout, self._clock, explain)

    @inlineCallbacks
    def _stop(self, instance_id: str):
        while True:
            try:
                operation = yield self._cloud.call("stop_instance", id=instance_id)
            except ApiCallFailed as error:
                if error.status == 404:
                    return "gone"
                if error.status != 409:
                    raise
                # The instance's state rejects a stop; find out which it is.
                state = yield self._settled_state(instance_id)
                if state == "running":
                    continue
                if state in ("stopped", "gone"):
                    return state
                raise ShutdownFailed(
                    f"instance {instance_id} is in state {state}, which cannot be "
                    "stopped; inspect it or delete it"
                ) from None

            yield self._cloud.wait_for_operation(operation)
            state = yield self._settled_state(instance_id, {"stopped"})
            if state in ("stopped", "gone"):
                return state
            raise ShutdownFailed(
                f"instance {instance_id} went to state {state} instead of stopped"
            )

    @inlineCallbacks
    def _delete(self, instance_id: str):
        try:
            operation = yield self._cloud.call("delete_instance", id=instance_id)
        except ApiCallFailed as error:
            if error.status == 404:
                return "gone"
            if error.status != 409:
                raise
            state = yield self._settled_state(instance_id, GONE_STATES)
            if state == "gone":
                return state
            raise ShutdownFailed(
                f"instance {instance_id} is in state {state}, which cannot be "
                "deleted"
            ) from None
        yield self._cloud.wait_for_operation(operation)
        return "gone"

    @inlineCallbacks
    def _settled_state(self, instance_id: str, goal: frozenset[str] | set[str] = ()):
        """
        Wait until the instance leaves a transient state such as "starting", and
        return its state, with every state of deletion and a 404 as "gone".
        """
        try:
            instance: dict[str, Any] = yield self._cloud.wait_for_instance_state(
                instance_id, set(_SETTLED_STATES) | set(goal)
            )
        except InstanceGone:
            return "gone"
        state = instance.get("state")
        return "gone" if state in GONE_STATES else state
