"""
The security groups of a simulated zone, with their rules.

The simulator stores rules and checks them, but does not filter any traffic: every
simulated Ollama server is reachable from loopback whatever its groups allow.
"""

from __future__ import annotations

import copy
import ipaddress
import uuid
from typing import Any

from exoproxy.simulator.errors import ApiError


class SecurityGroups:
    """
    The account's security groups of one zone, by id. The simulator has no public
    groups.
    """

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, Any]] = {}

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._groups

    def list(self, visibility: str | None = None) -> list[dict[str, Any]]:
        """
        List the groups of `visibility`, the account's own when None or `private`.
        """
        if visibility == "public":
            return []
        return copy.deepcopy(list(self._groups.values()))

    def _group(self, group_id: str) -> dict[str, Any]:
        group = self._groups.get(group_id)
        if group is None:
            raise ApiError(404, f"Security group {group_id} not found")
        return group

    def get(self, group_id: str) -> dict[str, Any]:
        """
        Return a copy of the group `group_id`, with its rules.

        Raises:
            ApiError: The group does not exist (404).
        """
        return copy.deepcopy(self._group(group_id))

    def create(self, body: dict[str, Any]) -> str:
        """
        Create a group from a create-security-group body.

        Returns:
            The id of the new group.

        Raises:
            ApiError: A group with the same name exists (409).
        """
        name = body["name"]
        if any(group["name"] == name for group in self._groups.values()):
            raise ApiError(409, f"Security group name {name!r} is already in use")

        group_id = str(uuid.uuid4())
        self._groups[group_id] = {
            "id": group_id,
            "name": name,
            "description": body.get("description", ""),
            "external-sources": [],
            "rules": [],
        }
        return group_id

    def add_rule(self, group_id: str, body: dict[str, Any]) -> None:
        """
        Add a rule from an add-rule-to-security-group body.

        Raises:
            ApiError: The group or the source group does not exist (404), or the
                rule has neither a network nor a source group, an invalid CIDR, or
                a start port above its end port (400).
        """
        group = self._group(group_id)
        rule = {"id": str(uuid.uuid4()), **body}

        network = body.get("network")
        source = body.get("security-group")
        if network is None and source is None:
            raise ApiError(400, "Invalid rule: network or security-group is required")
        if network is not None:
            try:
                rule["network"] = str(ipaddress.ip_network(network, strict=False))
            except ValueError as error:
                raise ApiError(400, f"Invalid network {network!r}: {error}") from error
        if source is not None:
            rule["security-group"] = self._rule_source(source)

        start_port, end_port = body.get("start-port"), body.get("end-port")
        if start_port is not None and end_port is not None and start_port > end_port:
            raise ApiError(400, "Invalid rule: start-port is greater than end-port")

        group["rules"].append(rule)

    def _rule_source(self, source: dict[str, Any]) -> dict[str, Any]:
        for group in self._groups.values():
            if group["id"] == source.get("id") or group["name"] == source.get("name"):
                return {"id": group["id"], "name": group["name"]}
        raise ApiError(404, f"Security group {source} not found")

    def delete_rule(self, group_id: str, rule_id: str) -> None:
        """
        Delete the rule `rule_id` of the group `group_id`.

        Raises:
            ApiError: The group or the rule does not exist (404).
        """
        group = self._group(group_id)
        rules = [rule for rule in group["rules"] if rule["id"] != rule_id]
        if len(rules) == len(group["rules"]):
            raise ApiError(
                404, f"Rule {rule_id} not found in security group {group_id}"
            )

        group["rules"] = rules
