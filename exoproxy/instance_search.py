"""
The search for the managed instance among the labelled ones: the choice of the one to
use, the retirement of the extra ones, and the record of those that need an operator.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from exoproxy.instance_actions import ACTIVE_STATES

log = Logger()

# The instance states in which a start or a wait makes progress, by priority when
# several labelled instances exist.
_STATE_PRIORITY = ("running", "starting", "stopping", "stopped")


def choose_instance(
    instances: list[dict[str, Any]], preferred_id: str | None = None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """
    Return the labelled instance to use and the other usable ones.

    The one to use is the most advanced by state (running, starting, stopping,
    stopped), then the one this daemon used before, then the oldest. Instances in
    error or being deleted are neither used nor returned.
    """

    def rank(instance: dict[str, Any]) -> tuple[int, bool, str, str]:
        return (
            _STATE_PRIORITY.index(instance["state"]),
            instance.get("id") != preferred_id,
            instance.get("created-at", ""),
            instance.get("id", ""),
        )

    usable = sorted(
        (i for i in instances if i.get("state") in _STATE_PRIORITY), key=rank
    )
    if not usable:
        return None, []
    return usable[0], usable[1:]


class InstanceSearch:
    """
    The methods of L{ExoscaleProvisioner} that find the labelled instance and retire
    the extra ones. They use the attributes that L{ExoscaleProvisioner.__init__}
    sets, so they work only in that class.
    """

    @inlineCallbacks
    def _find_instance(self):
        """
        List the labelled instances, retire the extra ones, and return the one to
        use, or None.
        """
        instances = yield self._cloud.list_managed_instances(self.labels)
        listed = {instance.get("id") for instance in instances}
        for instance_id in list(self.needs_attention):
            if instance_id not in listed:
                del self.needs_attention[instance_id]
        for instance in instances:
            instance_id = instance.get("id")
            if instance.get("state") == "error":
                self._needs_attention(
                    instance_id,
                    "in state error; exoproxy does not use it, so inspect it or "
                    "delete it",
                )
        keeper, extras = choose_instance(instances, self._instance_id)
        if keeper is not None:
            self._retire(extras, keeper["id"])
        return keeper

    def _retire(self, extras: list[dict[str, Any]], keeper_id: str) -> None:
        """
        Stop (or delete, with --idle-action destroy) the extra labelled instances,
        in the background, so that only one runs.
        """
        action = self._config.idle_action
        for instance in extras:
            instance_id, state = instance["id"], instance.get("state")
            if instance_id in self._retiring:
                continue
            if state not in ACTIVE_STATES and action != "destroy":
                self._needs_attention(
                    instance_id,
                    f"an extra instance in state {state}; exoproxy uses "
                    f"{keeper_id} and leaves this one alone, so delete it",
                )
                continue

            log.warn(
                "Instance {instance_id} is an extra instance labelled {labels}, in "
                "state {state}; exoproxy keeps using {keeper_id} and applies "
                "{action} to it",
                instance_id=instance_id,
                labels=self.labels,
                state=state,
                keeper_id=keeper_id,
                action=action,
            )
            retiring = self._actions.apply(
                action, instance_id, self._config.stop_timeout
            )
            self._retiring[instance_id] = retiring
            retiring.addBoth(self._retired, instance_id, action)

    def _needs_attention(self, instance_id: str, reason: str) -> None:
        """
        Record and log, once, a labelled instance that exoproxy leaves alone.
        """
        if self.needs_attention.get(instance_id) == reason:
            return
        self.needs_attention[instance_id] = reason
        log.warn(
            "Instance {instance_id} labelled {labels} is {reason}",
            instance_id=instance_id,
            labels=self.labels,
            reason=reason,
        )

    def _retired(self, result: str | Failure, instance_id: str, action: str) -> None:
        self._retiring.pop(instance_id, None)
        if isinstance(result, Failure):
            log.error(
                "Applying {action} to the extra instance {instance_id} failed: "
                "{error}",
                action=action,
                instance_id=instance_id,
                error=result.getErrorMessage(),
            )
            return
        log.info(
            "The extra instance {instance_id} is {result}",
            instance_id=instance_id,
            result=result,
        )

    def cancel_background(self) -> None:
        """
        Cancel the retirement of extra instances that is still in progress.
        """
        for retiring in list(self._retiring.values()):
            retiring.cancel()
