"""
The SSH ingress rules of the instance's security group, which follow
--allow-ssh-cidr.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

log = Logger()

_SSH_PORT = 22


class SshRules:
    """
    The method of L{ExoscaleProvisioner} that updates the SSH rules of the security
    group. It uses the attributes that L{ExoscaleProvisioner.__init__} sets, so it
    works only in that class.
    """

    @inlineCallbacks
    def _sync_ssh_rules(self, group_id: str):
        """
        Make the group's SSH ingress rules match --allow-ssh-cidr: add the missing
        networks and delete the others.
        """
        # NOTE: this runs only when an instance is created with --allow-ssh-cidr.
        # Dropping the option later leaves the group's SSH rules open, so they, or
        # the group, must be deleted by hand.
        wanted = set(self._config.ssh_networks)
        group = yield self._cloud.call("get_security_group", id=group_id)
        present = set()
        for rule in group.get("rules", []):
            is_ssh = (
                rule.get("flow-direction") == "ingress"
                and rule.get("protocol") == "tcp"
                and rule.get("start-port") == _SSH_PORT
                and rule.get("end-port") == _SSH_PORT
                and rule.get("network")
            )
            if not is_ssh:
                continue
            if rule["network"] in wanted:
                present.add(rule["network"])
                continue
            operation = yield self._cloud.call(
                "delete_rule_from_security_group", id=group_id, rule_id=rule["id"]
            )
            yield self._cloud.wait_for_operation(operation)
            log.info(
                "Closed SSH from {network} in security group {group_id}",
                network=rule["network"],
                group_id=group_id,
            )

        for network in sorted(wanted - present):
            operation = yield self._cloud.call(
                "add_rule_to_security_group",
                id=group_id,
                flow_direction="ingress",
                protocol="tcp",
                network=network,
                start_port=_SSH_PORT,
                end_port=_SSH_PORT,
                description="SSH for exoproxy (--allow-ssh-cidr)",
            )
            yield self._cloud.wait_for_operation(operation)
            log.info(
                "Opened SSH from {network} in security group {group_id}",
                network=network,
                group_id=group_id,
            )
