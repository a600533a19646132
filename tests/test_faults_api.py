"""
Exoscale API faults injected in the simulator, against a daemon that uses the real
SDK over loopback: which failures are retried and how, which are not, and that a
hung call never holds up the reactor.
"""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted

from tests.fault_daemon import (  # noqa: F401 (fixtures)
    GENERATE,
    Daemons,
    Zone,
    captured_log,
    daemons,
    request,
    sleep,
    wait_for_status,
    zone,
)


def retry_events(captured_log) -> list[dict]:
    return [
        event
        for event in captured_log.events
        if event.get("log_format", "").startswith("Exoscale API call {operation}")
    ]


def is_ready(status: dict) -> bool:
    return status["provisioning_status"] == "ready"


@pytest_twisted.inlineCallbacks
def test_rate_limit_waits_retry_after(zone, daemons, captured_log):
    zone.cloud.faults.fail_calls(
        "list-instances", "status", status=429, retry_after=1, count=2
    )
    _, base_url = yield daemons.start()

    waiting = yield wait_for_status(base_url, lambda s: s.get("api_retry"))
    assert waiting["api_retry"]["operation"] == "list-instances"
    assert "HTTP 429" in waiting["api_retry"]["error"]
    assert waiting["next_action"].startswith("retrying list-instances in ")

    yield wait_for_status(
        base_url,
        lambda s: s["provisioning_status"] == "idle" and "api_retry" not in s,
    )
    retries = retry_events(captured_log)
    assert [event["attempt"] for event in retries] == [1, 2]
    assert all(event["delay"] >= 1.0 for event in retries)
    assert {event["operation"] for event in retries} == {"list-instances"}
    assert all("429" in event["error"] for event in retries)
    assert [call.status for call in zone.calls("list-instances")] == [429, 429, 200]


@pytest_twisted.inlineCallbacks
def test_transient_faults_retried_to_ready(zone, daemons, captured_log):
    faults = zone.cloud.faults
    faults.fail_calls("list-templates", "drop")
    faults.fail_calls("list-instance-types", "malformed")
    faults.fail_calls("get-operation", "status", status=503)
    faults.fail_calls("get-instance", "status", status=500, count=2)
    _, base_url = yield daemons.start()

    code, _, body = yield request("POST", f"{base_url}/api/generate", GENERATE)
    assert code == 503
    assert json.loads(body)["provisioning"] is True

    yield wait_for_status(base_url, is_ready)
    assert len(zone.cloud.faults.created_instances) == 1
    for operation, faulted in (
        ("list-templates", 1),
        ("list-instance-types", 1),
        ("get-operation", 1),
        ("get-instance", 2),
    ):
        calls = zone.calls(operation)
        assert len([call for call in calls if call.fault]) == faulted, operation
        assert calls[-1].status == 200, operation
    retried = {event["operation"] for event in retry_events(captured_log)}
    assert retried == {
        "list-templates",
        "list-instance-types",
        "get-operation",
        "get-instance",
    }
    assert captured_log.failures() == []


@pytest.mark.parametrize("kind", ["status", "drop", "hang", "malformed"])
@pytest_twisted.inlineCallbacks
def test_lost_create_answer_adopts_instance(zone, daemons, kind):
    zone.cloud.faults.fail_calls("create-instance", kind, status=502, after=True)
    _, base_url = yield daemons.start(api_timeout="1")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, is_ready)

    assert len(zone.calls("create-instance")) == 1
    assert zone.cloud.faults.created_instances == [status["instance_id"]]
    assert list(zone.cloud.instances) == [status["instance_id"]]


@pytest_twisted.inlineCallbacks
def test_create_rejected_before_work_retried(zone, daemons):
    zone.cloud.faults.fail_calls("create-instance", "status", status=503)
    _, base_url = yield daemons.start()

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, is_ready)

    assert [call.status for call in zone.calls("create-instance")] == [503, 200]
    assert len(zone.cloud.faults.created_instances) == 1


@pytest_twisted.inlineCallbacks
def test_rate_limited_create_retried_in_place(zone, daemons):
    zone.cloud.faults.fail_calls(
        "create-instance", "status", status=429, retry_after=0, count=2
    )
    _, base_url = yield daemons.start()
    yield wait_for_status(base_url, lambda s: s["provisioning_status"] == "idle")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, is_ready)

    assert [call.status for call in zone.calls("create-instance")] == [429, 429, 200]
    # A 429 proves that nothing was created, so no look for the instance is needed.
    assert len(zone.calls("list-instances")) == 2


@pytest_twisted.inlineCallbacks
def test_hung_call_leaves_reactor_free(zone, daemons):
    zone.cloud.faults.fail_calls("list-instances", "hang")
    _, base_url = yield daemons.start(api_timeout="1", api_threads="1")

    yield wait_for_status(base_url, lambda s: s["phase"] == "finding instance")
    for path in ("/status", "/", "/api/tags", "/api/version"):
        started = time.monotonic()
        code, _, _ = yield request("GET", f"{base_url}{path}", timeout=2)
        assert code == 200, path
        assert time.monotonic() - started < 0.5, path
    assert zone.cloud.faults.armed()["hung_requests"] == 1

    status = yield wait_for_status(
        base_url, lambda s: s["provisioning_status"] == "idle", timeout=10
    )
    assert status["phase"] == "idle"
    assert [call.fault for call in zone.calls("list-instances")] == ["hang", None]

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, is_ready)


@pytest_twisted.inlineCallbacks
def test_bad_credentials_not_retried(zone, daemons, captured_log):
    _, base_url = yield daemons.start(
        secret="not-the-secret", run_retry_delay="2", run_retry_max_delay="2"
    )

    status = yield wait_for_status(
        base_url, lambda s: s["provisioning_status"] == "error"
    )
    assert "list-instances failed: HTTP 403" in status["error"]
    assert "check the API key" in status["error"]
    assert status["error_needs_operator"] is True
    assert "recurs until its cause is fixed" in status["next_action"]
    assert len(zone.calls("list-instances")) == 1
    assert retry_events(captured_log) == []
    assert captured_log.matching("list-instances failed: HTTP 403")

    # A request within the backoff gets the reason and makes no API call.
    code, headers, body = yield request("POST", f"{base_url}/api/generate", GENERATE)
    assert code == 503
    assert "HTTP 403" in json.loads(body)["error"]
    assert headers.getRawHeaders(b"retry-after")
    assert len(zone.calls("list-instances")) == 1

    yield sleep(2.1)
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, lambda s: s["provisioning_status"] == "error")
    assert len(zone.calls("list-instances")) == 2


@pytest_twisted.inlineCallbacks
def test_unavailable_type_not_retried(tmp_path, captured_log):
    zone = Zone(zone="ch-gva-2")
    zone.service.startService()
    yield zone.service.when_listening()
    daemons = Daemons(zone, tmp_path)
    try:
        _, base_url = yield daemons.start()
        yield request("POST", f"{base_url}/api/generate", GENERATE)
        status = yield wait_for_status(
            base_url, lambda s: s["provisioning_status"] == "error"
        )
    finally:
        yield daemons.stop_all()
        yield zone.service.stopService()

    assert "create-instance failed: HTTP 400" in status["error"]
    assert "not available in zone ch-gva-2" in status["error"]
    assert status["error_needs_operator"] is True
    assert len(zone.calls("create-instance")) == 1
    assert retry_events(captured_log) == []


@pytest_twisted.inlineCallbacks
def test_retries_exhausted_back_off(zone, daemons, captured_log):
    zone.cloud.faults.fail_calls("list-instances", "status", status=500, count=3)
    _, base_url = yield daemons.start(
        api_retries="3", run_retry_delay="2", run_retry_max_delay="2"
    )

    status = yield wait_for_status(
        base_url, lambda s: s["provisioning_status"] == "error"
    )
    assert "list-instances failed: HTTP 500" in status["error"]
    assert status["error_needs_operator"] is False
    assert len(zone.calls("list-instances")) == 3
    assert status["next_action"].startswith("retrying on the first request after")

    # Requests during the backoff do not reach the API.
    for _ in range(5):
        code, _, _ = yield request("POST", f"{base_url}/api/generate", GENERATE)
        assert code == 503
    assert len(zone.calls("list-instances")) == 3

    yield sleep(2.1)
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, is_ready)
    assert [call.status for call in zone.calls("list-instances")][-1] == 200
