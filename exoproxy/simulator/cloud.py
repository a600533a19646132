"""
The in-memory state of one simulated Exoscale zone.

`SimulatedCloud` has one method for each API operation that the simulator serves,
named after the operation id of the API spec. The methods take request fields that
`exoproxy.simulator.exoscale_api` has already checked against the spec, apply the
checks that the spec cannot express (ids that must exist, states that must allow an
action), and return the response object. Mutations return an `operation` that turns
from `pending` to `success` after the operation delay.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import uuid
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from exoproxy.simulator.catalog import build_instance_types, build_templates
from exoproxy.simulator.cloud_init import SimulatedBoot, UserDataError
from exoproxy.simulator.cloud_init import parse_user_data
from exoproxy.simulator.errors import ApiError
from exoproxy.simulator.faults import FaultInjector
from exoproxy.simulator.instance import InvalidTransition, SimulatedInstance
from exoproxy.simulator.models import format_timestamp
from exoproxy.simulator.security_groups import SecurityGroups
from exoproxy.simulator.timers import SimulatorTimings, TimerSet

__all__ = ["ApiCall", "ApiError", "SimulatedCloud", "SimulatorTimings"]

log = Logger()

# The `maxLength` of `user-data` in the create-instance body of the API spec.
USER_DATA_MAX_LENGTH = 32768

# 127.0.0.1 is where the daemon and the simulated API listen, so instances get
# addresses from 127.0.0.2 upward.
_FIRST_PUBLIC_IP = ipaddress.IPv4Address("127.0.0.2")
_LAST_PUBLIC_IP = ipaddress.IPv4Address("127.255.255.254")

# The fields of an instance in a list-instances reply, from the API spec.
_LISTED_INSTANCE_FIELDS = (
    "id",
    "name",
    "state",
    "created-at",
    "labels",
    "instance-type",
    "template",
    "security-groups",
    "public-ip-assignment",
    "public-ip",
    "private-networks",
    "mac-address",
    "ssh-keys",
)


@dataclass(frozen=True)
class ApiCall:
    """
    One API request received by the simulator.

    Attributes:
        operation: The operation id of the API spec, such as `get-instance`, or None
            for an unknown path.
        method: The HTTP method.
        path: The request path, without the query.
        status: The HTTP status of the response, or 0 when a fault left it without
            one.
        fault: The kind of the injected fault that the call got, if any.
    """

    operation: str | None
    method: str
    path: str
    status: int
    fault: str | None = None


class SimulatedCloud:
    """
    The instances, operations, security groups, templates and instance types of one
    simulated zone, and a log of the API calls it received.

    Args:
        reactor: The reactor that the simulated Ollama servers listen with.
        clock: The clock of every simulated delay.
        timings: The delays. None selects the defaults of `SimulatorTimings`.
        zone: The zone name.
        new_ip_on_start: Give an instance a new public IP each time it starts from
            `stopped`, as real Exoscale may. The simulator keeps it by default.
    """

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        timings: SimulatorTimings | None = None,
        *,
        zone: str = "at-vie-2",
        new_ip_on_start: bool = False,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.timings = timings if timings is not None else SimulatorTimings()
        self.zone = zone
        self.new_ip_on_start = new_ip_on_start

        self.instances: dict[str, SimulatedInstance] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.security_groups = SecurityGroups()
        self.templates = {t["id"]: t for t in build_templates(zone)}
        self.instance_types = {t["id"]: t for t in build_instance_types()}
        self.calls: list[ApiCall] = []

        self._timers = TimerSet(clock)
        # The faults to inject, and the record of what they did; see
        # exoproxy.simulator.faults.
        self.faults = FaultInjector(self)

    def record_call(self, call: ApiCall) -> None:
        """
        Append `call` to the log of API calls.
        """
        self.calls.append(call)

    def stop(self) -> Deferred[None]:
        """
        Cancel every pending delay and close every simulated Ollama server.

        Returns:
            A Deferred that fires once every Ollama connection is lost.
        """
        self._timers.cancel_all()
        self.faults.close()
        closing = [instance.close() for instance in self.instances.values()]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def _operation(self, reference_id: str, kind: str) -> dict[str, Any]:
        operation_id = str(uuid.uuid4())
        operation = {
            "id": operation_id,
            "state": "pending",
            "reference": {
                "id": reference_id,
                "link": f"/v2/{kind}/{reference_id}",
                "command": f"get-{kind}",
            },
        }
        self.operations[operation_id] = operation
        fault = self.faults.take_operation_fault()

        def succeed() -> None:
            if fault is None:
                operation["state"] = "success"
                return
            operation["state"] = "failure"
            if fault.reason is not None:
                operation["reason"] = fault.reason
            self.faults.operation_failed(fault, reference_id)

        if fault is None or fault.outcome != "pending":
            self._timers.call_later(self.timings.operation_delay, succeed)
        return dict(operation)

    def get_operation(self, id: str) -> dict[str, Any]:
        operation = self.operations.get(id)
        if operation is None:
            raise ApiError(404, f"Operation {id} not found")
        return {**operation, "reference": dict(operation["reference"])}

    def list_zones(self, api_endpoint: str) -> dict[str, Any]:
        """
        List the simulated zone, whose `api-endpoint` is `api_endpoint`.
        """
        # Only the simulated zone is listed, so that no endpoint in a reply points
        # at a real Exoscale host.
        return {"zones": [{"name": self.zone, "api-endpoint": api_endpoint}]}

    def list_templates(
        self, visibility: str | None = None, family: str | None = None
    ) -> dict[str, Any]:
        """
        List templates of `visibility` (public when None), of `family` if given.
        """
        visibility = visibility or "public"
        templates = [
            template
            for template in self.templates.values()
            if template["visibility"] == visibility
            and (family is None or template["family"] == family)
        ]
        return {"templates": copy.deepcopy(templates)}

    def get_template(self, id: str) -> dict[str, Any]:
        template = self.templates.get(id)
        if template is None:
            raise ApiError(404, f"Template {id} not found")
        return copy.deepcopy(template)

    def list_instance_types(self) -> dict[str, Any]:
        return {"instance-types": copy.deepcopy(list(self.instance_types.values()))}

    def get_instance_type(self, id: str) -> dict[str, Any]:
        instance_type = self.instance_types.get(id)
        if instance_type is None:
            raise ApiError(404, f"Instance type {id} not found")
        return copy.deepcopy(instance_type)

    def list_instances(
        self, labels: str | None = None, ip_address: str | None = None
    ) -> dict[str, Any]:
        """
        List instances that have every label of `labels` (`key=value` pairs joined
        by commas) and the public IP `ip_address`, each filter applying if given.
        """
        required_labels = _parse_labels_filter(labels) if labels else {}
        listed = []
        for instance in self.instances.values():
            if ip_address is not None and instance.public_ip != ip_address:
                continue
            instance_labels = instance.attributes["labels"]
            if any(
                instance_labels.get(key) != value
                for key, value in required_labels.items()
            ):
                continue

            payload = instance.to_api()
            listed.append(
                {k: payload[k] for k in _LISTED_INSTANCE_FIELDS if k in payload}
            )
        return {"instances": listed}

    def _instance(self, id: str) -> SimulatedInstance:
        instance = self.instances.get(id)
        if instance is None:
            raise ApiError(404, f"Instance {id} not found")
        return instance

    def get_instance(self, id: str) -> dict[str, Any]:
        """
        Return the instance `id`. Its `instance-type` and `template` contain only
        their `id`, and its `public-ip` is absent when none is assigned.
        """
        return self._instance(id).to_api()

    def create_instance(self, body: dict[str, Any]) -> dict[str, Any]:
        template_id = body["template"].get("id")
        if template_id not in self.templates:
            raise ApiError(400, f"Invalid template: template {template_id} not found")

        type_id = body["instance-type"].get("id")
        instance_type = self.instance_types.get(type_id)
        if instance_type is None:
            raise ApiError(400, f"Invalid instance-type: type {type_id} not found")
        if self.zone not in instance_type["zones"]:
            raise ApiError(
                400,
                f"Invalid instance-type: {instance_type['family']}."
                f"{instance_type['size']} is not available in zone {self.zone}",
            )

        group_ids = [group.get("id") for group in body.get("security-groups", [])]
        for group_id in group_ids:
            if group_id not in self.security_groups:
                raise ApiError(
                    400, f"Invalid security-groups: group {group_id} not found"
                )

        user_data = body.get("user-data")
        boot = self._check_user_data(user_data) if user_data is not None else None

        instance_id = str(uuid.uuid4())
        attributes: dict[str, Any] = {
            "id": instance_id,
            "name": body.get("name", f"instance-{instance_id[:8]}"),
            "created-at": _created_at(self.clock),
            "labels": dict(body.get("labels", {})),
            "disk-size": body["disk-size"],
            "instance-type": {"id": type_id},
            "template": {"id": template_id},
            "security-groups": [{"id": group_id} for group_id in group_ids],
            "ssh-keys": list(body.get("ssh-keys", [])),
            "mac-address": _mac_address(instance_id),
        }
        if user_data is not None:
            attributes["user-data"] = user_data

        public_ip = None
        if body.get("public-ip-assignment", "inet4") != "none":
            public_ip = self._allocate_public_ip()

        instance = SimulatedInstance(
            self,
            attributes,
            public_ip,
            boot or SimulatedBoot(port=None, models=()),
            auto_start=body.get("auto-start", True),
            faults=self.faults.faults_for_new_instance(instance_id),
        )
        self.instances[instance_id] = instance
        log.info(
            "Simulated instance {instance_id} created with public IP {public_ip}",
            instance_id=instance_id,
            public_ip=public_ip,
        )
        return self._operation(instance_id, "instance")

    def _check_user_data(self, user_data: str) -> SimulatedBoot:
        if len(user_data) > USER_DATA_MAX_LENGTH:
            raise ApiError(
                400,
                f"Invalid user-data: {len(user_data)} characters is more than the "
                f"maximum of {USER_DATA_MAX_LENGTH}",
            )
        try:
            base64.b64decode(user_data, validate=True)
        except binascii.Error as error:
            raise ApiError(
                400, f"Invalid user-data: not valid base64 ({error})"
            ) from error

        # Exoscale does not read user-data, so a document that the simulated
        # cloud-init cannot read boots an instance without Ollama, as it would.
        try:
            return parse_user_data(user_data)
        except UserDataError as error:
            log.error(
                "Simulated cloud-init cannot read the user-data, so no Ollama will "
                "start: {error}",
                error=str(error),
            )
            return SimulatedBoot(port=None, models=())

    def _act(self, id: str, action: str) -> dict[str, Any]:
        instance = self._instance(id)
        try:
            instance.apply(action)
        except InvalidTransition as error:
            raise ApiError(409, str(error)) from error
        return self._operation(id, "instance")

    def start_instance(
        self, id: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """
        Start the stopped instance `id`. A `rescue-profile` in `body` is ignored.
        """
        return self._act(id, "start")

    def stop_instance(self, id: str) -> dict[str, Any]:
        return self._act(id, "stop")

    def delete_instance(self, id: str) -> dict[str, Any]:
        return self._act(id, "delete")

    def _allocate_public_ip(self, exclude: str | None = None) -> str:
        in_use = {i.public_ip for i in self.instances.values()} | {exclude}
        address = _FIRST_PUBLIC_IP
        while str(address) in in_use:
            if address == _LAST_PUBLIC_IP:
                raise ApiError(500, "No free simulated public IP is left")
            address += 1
        return str(address)

    def reassign_public_ip(self, instance: SimulatedInstance) -> str | None:
        if instance.public_ip is None:
            return None
        return self._allocate_public_ip(exclude=instance.public_ip)

    def instance_destroyed(self, instance: SimulatedInstance) -> None:
        self.instances.pop(instance.id, None)

    def list_security_groups(self, visibility: str | None = None) -> dict[str, Any]:
        return {"security-groups": self.security_groups.list(visibility)}

    def get_security_group(self, id: str) -> dict[str, Any]:
        return self.security_groups.get(id)

    def create_security_group(self, body: dict[str, Any]) -> dict[str, Any]:
        group_id = self.security_groups.create(body)
        return self._operation(group_id, "security-group")

    def add_rule_to_security_group(
        self, id: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.security_groups.add_rule(id, body)
        return self._operation(id, "security-group")

    def delete_rule_from_security_group(self, id: str, rule_id: str) -> dict[str, Any]:
        self.security_groups.delete_rule(id, rule_id)
        return self._operation(id, "security-group")


def _mac_address(instance_id: str) -> str:
    """
    Derive a locally administered MAC address (first octet 06) from the id.
    """
    octets = [instance_id[i : i + 2] for i in (0, 2, 4, 6, 9)]
    return ":".join(["06", *octets])


def _created_at(clock: IReactorTime) -> str:
    """
    Format the clock's time as an API `created-at` value, to the second.
    """
    return format_timestamp(clock.seconds()).split(".")[0] + "Z"


def _parse_labels_filter(labels: str) -> dict[str, str]:
    required_labels = {}
    for pair in labels.split(","):
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ApiError(
                400,
                f"Invalid labels filter {labels!r}: expected key=value pairs "
                "joined by commas",
            )
        required_labels[key] = value
    return required_labels
