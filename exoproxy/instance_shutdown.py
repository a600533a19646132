"""
The stop or deletion of the labelled instances, with a record of what became of each.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, inlineCallbacks
from twisted.logger import Logger

from exoproxy.instance_actions import ACTIVE_STATES, GONE_STATES

log = Logger()


class InstanceShutdown:
    """
    The methods of L{ExoscaleProvisioner} that stop or delete instances. They use the
    attributes that L{ExoscaleProvisioner.__init__} sets, so they work only in that
    class.
    """

    @inlineCallbacks
    def shut_down_all(self, action: str):
        """
        Apply C{action} ("stop" or "destroy") to every labelled instance that it
        concerns: the running and starting ones for a stop, all for a destroy.

        Returns:
            A Deferred that fires with one sentence per instance, saying what
            happened to it.
        """
        instances = yield self._cloud.list_managed_instances(self.labels)
        if action == "destroy":
            targets = [i for i in instances if i.get("state") not in GONE_STATES]
        else:
            targets = [i for i in instances if i.get("state") in ACTIVE_STATES]

        outcomes = []
        for instance in targets:
            instance_id = instance["id"]
            try:
                result = yield self._actions.apply(
                    action, instance_id, self._config.stop_timeout
                )
            except CancelledError:
                raise
            except Exception as error:
                log.error(
                    "Applying {action} to instance {instance_id} failed: {error}",
                    action=action,
                    instance_id=instance_id,
                    error=str(error),
                )
                outcomes.append(f"{action} of instance {instance_id} failed: {error}")
                continue
            self._record_shut_down(instance_id, result)
            log.info(
                "Instance {instance_id} is {result} ({action})",
                instance_id=instance_id,
                result=result,
                action=action,
            )
            outcomes.append(f"instance {instance_id} is {result}")
        return outcomes

    @inlineCallbacks
    def shut_down(self, instance_id: str, action: str | None = None):
        """
        Stop or destroy the instance, as C{action} selects (by default the idle
        action), and wait until that has happened, within --stop-timeout.
        """
        action = action or self._config.idle_action
        result = yield self._actions.apply(
            action, instance_id, self._config.stop_timeout
        )
        self._record_shut_down(instance_id, result)
        if result == "gone":
            log.info("Instance {instance_id} is deleted", instance_id=instance_id)
        else:
            log.info("Stopped instance {instance_id}", instance_id=instance_id)

    def _record_shut_down(self, instance_id: str, result: str) -> None:
        if result == "gone":
            self._deleted.add(instance_id)
        if self._instance_id not in (None, instance_id):
            return
        if result == "gone":
            self._instance_id = None
            self.instance_state = "destroyed"
        else:
            self.instance_state = result
