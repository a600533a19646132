"""
Unit tests of the simulated zone's state on a fake clock: instance transitions,
operations, public IPs and the checks that the API spec cannot express.

Instances here have no user-data, so no Ollama server listens and no reactor is
needed.
"""

from __future__ import annotations

import base64

import pytest
from twisted.internet.task import Clock

from exoproxy.simulator.cloud import ApiError, SimulatedCloud
from exoproxy.simulator.timers import SimulatorTimings

from .conftest import create_body

TIMINGS = SimulatorTimings(
    operation_delay=1.0,
    start_delay=10.0,
    stop_delay=5.0,
    boot_delay=3.0,
    pull_delay=2.0,
    token_interval=0.1,
)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def cloud(clock):
    zone = SimulatedCloud(None, clock, TIMINGS)
    yield zone
    zone.stop()
    assert clock.getDelayedCalls() == []


def create(cloud, **fields) -> str:
    operation = cloud.create_instance(create_body(cloud, **fields))
    return operation["reference"]["id"]


def state(cloud, instance_id: str) -> str:
    return cloud.get_instance(instance_id)["state"]


def test_create_starts_then_runs(cloud, clock):
    instance_id = create(cloud)
    assert state(cloud, instance_id) == "starting"

    clock.advance(9.9)
    assert state(cloud, instance_id) == "starting"

    clock.advance(0.1)
    assert state(cloud, instance_id) == "running"


def test_create_without_auto_start(cloud, clock):
    instance_id = create(cloud, **{"auto-start": False})

    assert state(cloud, instance_id) == "stopped"


def test_stop_then_start(cloud, clock):
    instance_id = create(cloud)
    clock.advance(10)

    cloud.stop_instance(instance_id)
    assert state(cloud, instance_id) == "stopping"
    clock.advance(5)
    assert state(cloud, instance_id) == "stopped"

    cloud.start_instance(instance_id)
    assert state(cloud, instance_id) == "starting"
    clock.advance(10)
    assert state(cloud, instance_id) == "running"


@pytest.mark.parametrize(
    ("settle", "action"),
    [
        (10, "start"),  # running
        (0, "stop"),  # starting
        (0, "start"),  # starting
    ],
)
def test_invalid_transition_conflict(cloud, clock, settle, action):
    instance_id = create(cloud)
    clock.advance(settle)

    with pytest.raises(ApiError) as raised:
        getattr(cloud, f"{action}_instance")(instance_id)

    assert raised.value.status == 409
    assert action in raised.value.message


def test_stop_stopped_conflict(cloud, clock):
    instance_id = create(cloud, **{"auto-start": False})

    with pytest.raises(ApiError) as raised:
        cloud.stop_instance(instance_id)

    assert raised.value.status == 409


def test_delete_then_gone(cloud, clock):
    instance_id = create(cloud)
    clock.advance(10)

    cloud.delete_instance(instance_id)
    assert state(cloud, instance_id) == "destroying"

    clock.advance(1)
    with pytest.raises(ApiError) as raised:
        cloud.get_instance(instance_id)
    assert raised.value.status == 404


def test_delete_while_starting(cloud, clock):
    instance_id = create(cloud)
    clock.advance(1)

    cloud.delete_instance(instance_id)
    clock.advance(20)

    assert instance_id not in cloud.instances


def test_operation_pending_then_success(cloud, clock):
    operation = cloud.create_instance(create_body(cloud))
    assert operation["state"] == "pending"
    assert cloud.get_operation(operation["id"])["state"] == "pending"

    clock.advance(1)

    assert cloud.get_operation(operation["id"])["state"] == "success"
    assert operation["reference"]["command"] == "get-instance"
    assert (
        operation["reference"]["link"] == f"/v2/instance/{operation['reference']['id']}"
    )


def test_unknown_operation_not_found(cloud):
    with pytest.raises(ApiError) as raised:
        cloud.get_operation("00000000-0000-0000-0000-000000000000")

    assert raised.value.status == 404


def test_public_ips_distinct_loopback(cloud):
    addresses = [cloud.get_instance(create(cloud))["public-ip"] for _ in range(3)]

    assert addresses == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def test_public_ip_reused_after_delete(cloud, clock):
    first = create(cloud)
    create(cloud)
    cloud.delete_instance(first)
    clock.advance(1)

    assert cloud.get_instance(create(cloud))["public-ip"] == "127.0.0.2"


def test_public_ip_kept_on_restart(cloud, clock):
    instance_id = create(cloud)
    clock.advance(10)
    cloud.stop_instance(instance_id)
    clock.advance(5)
    cloud.start_instance(instance_id)

    assert cloud.get_instance(instance_id)["public-ip"] == "127.0.0.2"


def test_new_ip_on_start(clock):
    cloud = SimulatedCloud(None, clock, TIMINGS, new_ip_on_start=True)
    instance_id = create(cloud)
    clock.advance(10)
    cloud.stop_instance(instance_id)
    clock.advance(5)
    cloud.start_instance(instance_id)

    assert cloud.get_instance(instance_id)["public-ip"] == "127.0.0.3"
    cloud.stop()


def test_no_public_ip_assignment(cloud):
    instance = cloud.get_instance(create(cloud, **{"public-ip-assignment": "none"}))

    assert "public-ip" not in instance
    assert instance["public-ip-assignment"] == "none"


def test_unknown_template_rejected(cloud):
    body = create_body(cloud, template={"id": "00000000-0000-0000-0000-000000000000"})

    with pytest.raises(ApiError) as raised:
        cloud.create_instance(body)

    assert raised.value.status == 400
    assert "template" in raised.value.message


def test_unknown_instance_type_rejected(cloud):
    body = create_body(
        cloud, **{"instance-type": {"id": "00000000-0000-0000-0000-000000000000"}}
    )

    with pytest.raises(ApiError) as raised:
        cloud.create_instance(body)

    assert raised.value.status == 400
    assert "instance-type" in raised.value.message


def test_instance_type_outside_zone_rejected(clock):
    cloud = SimulatedCloud(None, clock, TIMINGS, zone="bg-sof-1")

    with pytest.raises(ApiError) as raised:
        cloud.create_instance(create_body(cloud))

    assert raised.value.status == 400
    assert "not available in zone bg-sof-1" in raised.value.message


def test_unknown_security_group_rejected(cloud):
    groups = [{"id": "00000000-0000-0000-0000-000000000000"}]

    with pytest.raises(ApiError) as raised:
        cloud.create_instance(create_body(cloud, **{"security-groups": groups}))

    assert raised.value.status == 400
    assert "security-groups" in raised.value.message


def test_invalid_base64_user_data_rejected(cloud):
    with pytest.raises(ApiError) as raised:
        cloud.create_instance(create_body(cloud, **{"user-data": "not base64!"}))

    assert raised.value.status == 400
    assert "base64" in raised.value.message


def test_long_user_data_rejected(cloud):
    user_data = base64.b64encode(b"#cloud-config\n" + b"x" * 24600).decode()
    assert len(user_data) > 32768

    with pytest.raises(ApiError) as raised:
        cloud.create_instance(create_body(cloud, **{"user-data": user_data}))

    assert raised.value.status == 400
    assert "32768" in raised.value.message


def test_unreadable_user_data_boots(cloud, clock):
    user_data = base64.b64encode(b"#cloud-config\nwrite_files: [unclosed\n").decode()

    instance_id = create(cloud, **{"user-data": user_data})
    clock.advance(20)

    assert state(cloud, instance_id) == "running"
    assert cloud.instances[instance_id].ollama_port is None


@pytest.mark.parametrize("labels", ["a", "=1", "a=1,b"])
def test_malformed_labels_filter(cloud, labels):
    with pytest.raises(ApiError) as raised:
        cloud.list_instances(labels=labels)

    assert raised.value.status == 400


def test_security_group_rules(cloud):
    operation = cloud.create_security_group({"name": "exoproxy", "description": "x"})
    group_id = operation["reference"]["id"]
    rule = {
        "flow-direction": "ingress",
        "protocol": "tcp",
        "start-port": 11434,
        "end-port": 11434,
        "network": "127.0.0.1",
    }

    cloud.add_rule_to_security_group(group_id, rule)
    [stored] = cloud.get_security_group(group_id)["rules"]
    assert stored["network"] == "127.0.0.1/32"

    cloud.delete_rule_from_security_group(group_id, stored["id"])
    assert cloud.get_security_group(group_id)["rules"] == []


def test_duplicate_security_group_conflict(cloud):
    cloud.create_security_group({"name": "exoproxy"})

    with pytest.raises(ApiError) as raised:
        cloud.create_security_group({"name": "exoproxy"})

    assert raised.value.status == 409


@pytest.mark.parametrize(
    "rule",
    [
        {"flow-direction": "ingress", "protocol": "tcp"},
        {"flow-direction": "ingress", "protocol": "tcp", "network": "not-a-cidr"},
        {
            "flow-direction": "ingress",
            "protocol": "tcp",
            "network": "0.0.0.0/0",
            "start-port": 20,
            "end-port": 10,
        },
    ],
)
def test_invalid_rule_rejected(cloud, rule):
    group_id = cloud.create_security_group({"name": "g"})["reference"]["id"]

    with pytest.raises(ApiError) as raised:
        cloud.add_rule_to_security_group(group_id, rule)

    assert raised.value.status == 400


def test_unknown_rule_not_found(cloud):
    group_id = cloud.create_security_group({"name": "g"})["reference"]["id"]

    with pytest.raises(ApiError) as raised:
        cloud.delete_rule_from_security_group(
            group_id, "00000000-0000-0000-0000-000000000000"
        )

    assert raised.value.status == 404


def test_rule_source_group_by_name(cloud):
    source_id = cloud.create_security_group({"name": "source"})["reference"]["id"]
    group_id = cloud.create_security_group({"name": "g"})["reference"]["id"]
    rule = {
        "flow-direction": "ingress",
        "protocol": "tcp",
        "security-group": {"name": "source"},
    }

    cloud.add_rule_to_security_group(group_id, rule)

    [stored] = cloud.get_security_group(group_id)["rules"]
    assert stored["security-group"] == {"id": source_id, "name": "source"}
