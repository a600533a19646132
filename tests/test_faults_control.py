"""
The simulator's control API under `/_control`, over HTTP as a person with curl
uses it: it needs no signature, arms faults that the SDK then meets, shows the
zone's state, and rejects invalid requests with a JSON message.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from exoscale.api.exceptions import ExoscaleAPIServerException
from exoscale.api.v2 import Client
from requests.exceptions import ConnectionError
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.fault_daemon import API_KEY, request, zone  # noqa: F401 (fixtures)


def control_url(zone, path: str = "") -> str:
    return zone.api_url.removesuffix("/v2") + "/_control" + path


@inlineCallbacks
def post(zone, path: str, body: dict):
    code, _, content = yield request(
        "POST", control_url(zone, path), json.dumps(body).encode()
    )
    return code, json.loads(content)


@pytest.fixture
def sdk(zone):
    client = Client(API_KEY, zone.secret, url=zone.api_url)
    yield client
    client.http_client.close()


@pytest_twisted.inlineCallbacks
def test_armed_fault_meets_sdk(zone, sdk):
    code, answer = yield post(
        zone,
        "/api-faults",
        {"operation": "list-instances", "status": 503, "count": 2, "retry_after": 4},
    )
    assert code == 200
    assert answer["armed"]["remaining"] == 2

    for _ in range(2):
        with pytest.raises(ExoscaleAPIServerException) as raised:
            yield deferToThread(sdk.list_instances)
        assert raised.value.response.status_code == 503
        assert raised.value.response.headers["Retry-After"] == "4"
    listed = yield deferToThread(sdk.list_instances)
    assert listed == {"instances": []}

    code, _, content = yield request("GET", control_url(zone))
    state = json.loads(content)
    assert code == 200
    assert [call["status"] for call in state["calls"]] == [503, 503, 200]
    assert [call["fault"] for call in state["calls"]] == ["status", "status", None]
    assert state["faults"]["api"] == []
    assert state["instances"] == []
    assert state["fault_log"] == ["list-instances: status"] * 2


@pytest_twisted.inlineCallbacks
def test_dropped_connection_meets_sdk(zone, sdk):
    code, _ = yield post(zone, "/api-faults", {"operation": "*", "kind": "drop"})
    assert code == 200
    with pytest.raises(ConnectionError):
        yield deferToThread(sdk.list_instance_types)


@pytest_twisted.inlineCallbacks
def test_operation_and_instance_faults_armed(zone):
    code, answer = yield post(
        zone,
        "/operation-faults",
        {"operation": "start-instance", "outcome": "failure", "reason": None},
    )
    assert code == 200
    assert answer["armed"]["reason"] is None

    code, answer = yield post(zone, "/instance-faults", {"kind": "ollama-never"})
    assert code == 200
    assert answer["armed"]["next_instance"]["ollama_never_listens"] is True

    code, _, content = yield request("DELETE", control_url(zone, "/faults"))
    assert code == 200
    cleared = json.loads(content)["armed"]
    assert cleared["operations"] == []
    assert cleared["next_instance"]["ollama_never_listens"] is False


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/api-faults", {"operation": "get-instance", "kind": "explode"}, "unknown"),
        ("/api-faults", {"operation": "get-instance", "count": 0}, "count"),
        ("/api-faults", {"operation": "get-instance", "status": 200}, "status"),
        ("/api-faults", {"kind": "drop"}, "missing operation"),
        ("/api-faults", {"operation": "x", "count": "two"}, "count must be"),
        ("/operation-faults", {"operation": "x", "outcome": "late"}, "outcome"),
        ("/instance-faults", {"kind": "error", "instance_id": "nope"}, "not exist"),
        ("/instance-faults", {"kind": "melt"}, "unknown instance fault"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_invalid_fault_rejected(zone, path, body, message):
    code, answer = yield post(zone, path, body)
    assert code == 400
    assert message in answer["message"]


@pytest_twisted.inlineCallbacks
def test_unknown_control_paths(zone):
    code, _, content = yield request("GET", control_url(zone, "/nothing"))
    assert code == 404
    assert json.loads(content)["message"] == "unknown control path"

    code, _, _ = yield request("GET", control_url(zone, "/api-faults"))
    assert code == 405

    code, _, content = yield request(
        "POST", control_url(zone, "/api-faults"), b"{not json"
    )
    assert code == 400
    assert "invalid JSON" in json.loads(content)["message"]
