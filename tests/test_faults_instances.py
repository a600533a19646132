"""
Operation and instance faults injected in the simulator: operations that fail or
never end, instances that never run, break, lose their address or disappear, and an
Ollama that never comes up, never pulls its model or crashes in a stream.
"""

from __future__ import annotations

import json
import time

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from tests.fault_daemon import (  # noqa: F401 (fixtures)
    GENERATE,
    MODEL,
    captured_log,
    daemons,
    request,
    sleep,
    wait_for_status,
    wait_until,
    zone,
)

STREAM = json.dumps({"model": MODEL, "prompt": "tell me a story"}).encode()


def state_is(name: str):
    return lambda status: status["provisioning_status"] == name


@inlineCallbacks
def ready_daemon(daemons, **overrides):
    service, base_url = yield daemons.start(**overrides)
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("ready"))
    return service, base_url, status["instance_id"]


@pytest_twisted.inlineCallbacks
def test_failed_create_operation_reported(zone, daemons, captured_log):
    zone.cloud.faults.fail_operations("create-instance", reason="no GPU left in zone")
    _, base_url = yield daemons.start()

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("error"))
    assert "ended in failure: no GPU left in zone" in status["error"]
    assert zone.cloud.instances == {}

    yield sleep(0.4)
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, state_is("ready"))
    assert len(zone.cloud.instances) == 1
    assert captured_log.failures() == []


@pytest_twisted.inlineCallbacks
def test_failed_operation_without_reason(zone, daemons, captured_log):
    _, base_url, _ = yield ready_daemon(daemons, idle_timeout="1")
    yield wait_for_status(base_url, lambda s: s["instance_status"] == "stopped")

    zone.cloud.faults.fail_operations("start-instance", reason=None)
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("error"))
    assert status["error"].endswith("ended in failure: no reason given")
    assert captured_log.failures() == []
    assert not captured_log.matching("KeyError")


@pytest_twisted.inlineCallbacks
def test_pending_operation_times_out(zone, daemons):
    zone.cloud.faults.fail_operations("create-instance", outcome="pending")
    _, base_url = yield daemons.start(ready_timeout="1.5")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    waiting = yield wait_for_status(
        base_url, lambda s: s["phase"] == "creating instance"
    )
    assert "--on-ready-timeout stop applies" in waiting["next_action"]
    status = yield wait_for_status(base_url, state_is("error"))

    assert "not ready within 2 s (--ready-timeout)" in status["error"]
    [instance_id] = zone.cloud.instances
    assert f"instance {instance_id} is stopped" in status["error"]
    assert zone.states() == ["stopped"]


@pytest_twisted.inlineCallbacks
def test_never_running_instance_destroyed(zone, daemons):
    zone.cloud.faults.break_instance("never-running")
    _, base_url = yield daemons.start(ready_timeout="1", on_ready_timeout="destroy")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("error"))

    assert "not ready within 1 s" in status["error"]
    assert "is gone" in status["error"]
    yield wait_until(lambda: not zone.cloud.instances, 5, "the deletion")
    assert len(zone.calls("delete-instance")) == 1


@pytest_twisted.inlineCallbacks
def test_instance_error_left_for_operator(zone, daemons):
    zone.cloud.faults.break_instance("error", delay=0.02)
    _, base_url = yield daemons.start(run_retry_delay="0.2")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("error"))
    [broken] = zone.cloud.instances
    assert status["error"] == f"instance {broken} is in state error"

    yield sleep(0.3)
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("ready"))
    assert status["instance_id"] != broken
    assert broken in status["instances_needing_attention"]
    assert "state error" in status["instances_needing_attention"][broken]
    assert sorted(zone.states()) == ["error", "running"]


@pytest_twisted.inlineCallbacks
def test_instance_error_destroyed(zone, daemons):
    zone.cloud.faults.break_instance("error", delay=0.02)
    _, base_url = yield daemons.start(on_ready_timeout="destroy")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("error"))
    assert "is in state error; instance" in status["error"]
    assert status["error"].endswith("is gone")
    yield wait_until(lambda: not zone.cloud.instances, 5, "the deletion")


@pytest_twisted.inlineCallbacks
def test_lost_public_ip_stops_instance(zone, daemons, captured_log):
    _, base_url, instance_id = yield ready_daemon(daemons)
    zone.cloud.faults.break_instance("lose-ip", instance_id)

    code, _, body = yield request("POST", f"{base_url}/api/generate", GENERATE)
    assert code == 502
    assert "cannot connect to the Ollama backend" in json.loads(body)["error"]

    status = yield wait_for_status(base_url, state_is("error"))
    assert f"instance {instance_id} has no public-ip" in status["error"]
    assert f"instance {instance_id} is stopped" in status["error"]
    assert zone.states() == ["stopped"]
    assert captured_log.matching("checking it before the next request is proxied")


@pytest_twisted.inlineCallbacks
def test_deleted_instance_created_again(zone, daemons):
    _, base_url, instance_id = yield ready_daemon(daemons)
    zone.cloud.faults.break_instance("delete", instance_id)
    yield wait_until(lambda: not zone.cloud.instances, 5, "the deletion")

    code, _, body = yield request("POST", f"{base_url}/api/generate", GENERATE)
    assert code == 502
    assert json.loads(body)["error"]

    status = yield wait_for_status(base_url, state_is("idle"))
    assert status["instance_id"] is None
    assert status["next_action"].startswith("bringing an instance up")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("ready"))
    assert status["instance_id"] != instance_id
    assert len(zone.cloud.faults.created_instances) == 2
    assert list(zone.cloud.instances) == [status["instance_id"]]


@pytest_twisted.inlineCallbacks
def test_stop_of_deleted_instance_succeeds(zone, daemons, captured_log):
    _, base_url, instance_id = yield ready_daemon(daemons, idle_timeout="1")
    zone.cloud.faults.break_instance("delete", instance_id)

    status = yield wait_for_status(
        base_url,
        lambda s: s["provisioning_status"] in ("idle", "error")
        and s["last_stop_reason"] == "idle",
        timeout=10,
    )
    assert status["provisioning_status"] == "idle"
    assert "error" not in status
    assert [call.status for call in zone.calls("stop-instance")] == [404]
    assert zone.cloud.instances == {}
    assert captured_log.failures() == []


@pytest_twisted.inlineCallbacks
def test_ollama_never_up_stops_instance(zone, daemons):
    zone.cloud.faults.break_instance("ollama-never")
    _, base_url = yield daemons.start(ready_timeout="1.5")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, lambda s: s["phase"] == "waiting for ollama")
    status = yield wait_for_status(base_url, state_is("error"))

    assert "not ready within 2 s (--ready-timeout)" in status["error"]
    assert status["error"].endswith("is stopped")
    assert status["instance_status"] == "stopped"
    assert zone.states() == ["stopped"]


@pytest_twisted.inlineCallbacks
def test_pull_never_finishing_stops_instance(zone, daemons):
    zone.cloud.faults.break_instance("never-pull")
    _, base_url = yield daemons.start(ready_timeout="1.5")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_for_status(base_url, lambda s: s["phase"] == "pulling model")
    status = yield wait_for_status(base_url, state_is("error"))

    assert "not ready within 2 s" in status["error"]
    assert zone.states() == ["stopped"]


@pytest_twisted.inlineCallbacks
def test_kept_instance_left_running(zone, daemons):
    zone.cloud.faults.break_instance("ollama-never")
    _, base_url = yield daemons.start(
        ready_timeout="1", on_ready_timeout="keep", idle_timeout="1"
    )

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("error"))
    [instance_id] = zone.cloud.instances
    assert "left as it is for inspection (--on-ready-timeout keep)" in status["error"]
    assert f"instance {instance_id} is left running" in status["next_action"]

    # Past the idle timeout, the error state does not stop a kept instance.
    yield sleep(1.5)
    assert zone.states() == ["running"]
    assert zone.calls("stop-instance") == []


@pytest_twisted.inlineCallbacks
def test_failed_cleanup_stopped_later(zone, daemons):
    zone.cloud.faults.break_instance("ollama-never")
    zone.cloud.faults.fail_calls("stop-instance", "status", status=403)
    _, base_url = yield daemons.start(ready_timeout="1", idle_timeout="1")

    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("error"))
    assert "stop of instance" in status["error"]
    assert "stop-instance failed: HTTP 403" in status["error"]

    # Once no request has come for the idle timeout, the error state stops it.
    yield wait_until(lambda: zone.states() == ["stopped"], 10, "the later stop")
    assert [call.status for call in zone.calls("stop-instance")] == [403, 200]


@pytest_twisted.inlineCallbacks
def test_stream_crash_truncates_then_rechecks(zone, daemons, captured_log):
    _, base_url, instance_id = yield ready_daemon(daemons)
    zone.cloud.faults.break_instance(
        "crash-stream", instance_id, after_chunks=3, restart_after=0.3
    )

    started = time.monotonic()
    response = yield treq.post(f"{base_url}/api/generate", data=STREAM)
    assert response.code == 200
    chunks: list[bytes] = []
    try:
        yield treq.collect(response, chunks.append).addTimeout(5, reactor)
    except Exception as error:
        broken = error
    else:
        broken = None
    assert broken is not None, "the truncated stream ended cleanly"
    assert time.monotonic() - started < 5
    lines = b"".join(chunks).splitlines()
    assert 0 < len(lines) <= 3
    assert all(json.loads(line)["done"] is False for line in lines)

    checking = yield wait_for_status(
        base_url, lambda s: s["phase"] in ("checking the backend", "waiting for ollama")
    )
    assert checking["provisioning_status"] == "provisioning"
    status = yield wait_for_status(base_url, state_is("ready"))
    assert status["instance_id"] == instance_id

    response = yield treq.post(f"{base_url}/api/generate", data=STREAM)
    body = yield treq.content(response)
    assert json.loads(body.splitlines()[-1])["done"] is True
    assert len(zone.calls("create-instance")) == 1
    assert captured_log.matching("The backend broke off the response")
