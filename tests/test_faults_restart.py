"""
Restarts, shutdowns and the cost guard, on a simulated zone that outlives the
daemons: adoption of a running instance at startup, a restart in the middle of a
cold start, extra labelled instances, --on-exit, and --max-instance-hours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.threads import deferToThread

from exoproxy.simulator.cloud import SimulatedCloud
from tests.daemon import free_port
from tests.fault_daemon import (  # noqa: F401 (fixtures)
    FAST_TIMINGS,
    GENERATE,
    MODEL,
    Daemons,
    Zone,
    captured_log,
    daemon_arguments,
    daemons,
    request,
    sleep,
    status_of,
    wait_for_status,
    wait_until,
    zone,
)
from tests.test_twistd import REPOSITORY, twistd_command

LABELS = {"managed-by": "exoproxy", "exoproxy-name": "exoproxy"}


def state_is(name: str):
    return lambda status: status["provisioning_status"] == name


def create_labelled(cloud: SimulatedCloud) -> str:
    """
    Create a labelled instance behind exoproxy's back, without any Ollama.
    """
    template = next(
        t for t in cloud.templates.values() if t["name"].startswith("Linux Ubuntu 24")
    )
    instance_type = next(
        t
        for t in cloud.instance_types.values()
        if (t["family"], t["size"]) == ("gpua5000", "small")
    )
    operation = cloud.create_instance(
        {
            "template": {"id": template["id"]},
            "instance-type": {"id": instance_type["id"]},
            "disk-size": 50,
            "labels": dict(LABELS),
        }
    )
    return operation["reference"]["id"]


@pytest.fixture
def slow_pull_zone():
    started = Zone(dataclasses.replace(FAST_TIMINGS, pull_delay=2.0))
    started.service.startService()
    pytest_twisted.blockon(started.service.when_listening())
    yield started
    pytest_twisted.blockon(started.service.stopService())


@inlineCallbacks
def ready_daemon(daemons, **overrides):
    service, base_url = yield daemons.start(**overrides)
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("ready"))
    return service, base_url, status["instance_id"]


@pytest_twisted.inlineCallbacks
def test_startup_adopts_running_instance(zone, daemons):
    first, _, instance_id = yield ready_daemon(daemons, on_exit="keep")
    yield daemons.stop(first)
    assert zone.states() == ["running"]

    _, base_url = yield daemons.start(idle_timeout="1.5")
    status = yield wait_for_status(base_url, state_is("ready"))
    assert status["instance_id"] == instance_id
    assert status["next_action"].startswith("stopping idle instance in")

    status = yield wait_for_status(
        base_url, lambda s: s["instance_status"] == "stopped", timeout=10
    )
    assert status["last_stop_reason"] == "idle"
    assert zone.states() == ["stopped"]
    assert len(zone.calls("create-instance")) == 1


@pytest_twisted.inlineCallbacks
def test_startup_leaves_stopped_instance(zone, daemons):
    first, _, instance_id = yield ready_daemon(daemons)
    yield daemons.stop(first)
    assert zone.states() == ["stopped"]

    _, base_url = yield daemons.start()
    status = yield wait_for_status(
        base_url, lambda s: state_is("idle")(s) and s["phase"] == "stopped"
    )
    assert status["instance_id"] == instance_id
    assert f"starting instance {instance_id}" in status["next_action"]
    assert zone.calls("start-instance") == []


@pytest_twisted.inlineCallbacks
def test_restart_mid_cold_start_adopts(slow_pull_zone, tmp_path):
    zone = slow_pull_zone
    daemons = Daemons(zone, tmp_path)
    try:
        first, base_url = yield daemons.start(on_exit="keep")
        yield request("POST", f"{base_url}/api/generate", GENERATE)
        yield wait_for_status(base_url, lambda s: s["phase"] == "pulling model")
        yield daemons.stop(first)

        _, base_url = yield daemons.start()
        adopting = yield wait_for_status(base_url, state_is("provisioning"))
        assert adopting["phase"] in ("finding instance", "waiting for boot")
        status = yield wait_for_status(base_url, state_is("ready"))
    finally:
        yield daemons.stop_all()

    assert len(zone.calls("create-instance")) == 1
    assert len(zone.cloud.faults.created_instances) == 1
    assert status["instance_id"] == zone.cloud.faults.created_instances[0]
    assert zone.states() == ["stopped"]


@pytest.mark.parametrize(
    "idle_action, extra_states", [("stop", {"stopped"}), ("destroy", set())]
)
@pytest_twisted.inlineCallbacks
def test_extra_instances_retired(
    zone, daemons, captured_log, idle_action, extra_states
):
    first, _, instance_id = yield ready_daemon(daemons, on_exit="keep")
    yield daemons.stop(first)
    # The API gives created-at to the second; the extra instances are younger.
    yield sleep(1.1)
    extras = [create_labelled(zone.cloud), create_labelled(zone.cloud)]
    yield wait_until(lambda: len(zone.running()) == 3, 5, "three running instances")

    _, base_url = yield daemons.start(idle_action=idle_action)
    status = yield wait_for_status(base_url, state_is("ready"))
    assert status["instance_id"] == instance_id

    def retired():
        states = {
            instance.state.value
            for instance_id, instance in zone.cloud.instances.items()
            if instance_id in extras
        }
        return states == extra_states

    yield wait_until(retired, 10, "the extra instances to be retired")
    assert zone.running() == [instance_id]
    for extra in extras:
        assert captured_log.matching(f"Instance {extra} is an extra instance")
    assert len(zone.calls("create-instance")) == 1


@pytest.mark.parametrize(
    "action, states", [("stop", ["stopped"]), ("keep", ["running"]), ("destroy", [])]
)
@pytest_twisted.inlineCallbacks
def test_exit_action_applied(zone, daemons, action, states):
    daemons.instance_may_outlive = action == "keep"
    service, _, _ = yield ready_daemon(daemons, on_exit=action)
    yield daemons.stop(service)
    yield wait_until(lambda: zone.states() == states, 5, f"the instance {states}")


@pytest_twisted.inlineCallbacks
def test_exit_during_create_stops_instance(zone, daemons, captured_log):
    zone.cloud.faults.fail_calls("create-instance", "hang", after=True)
    service, base_url = yield daemons.start(api_timeout="1.5", shutdown_timeout="5")
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    yield wait_until(lambda: zone.cloud.instances, 5, "the instance to exist")
    assert zone.cloud.faults.armed()["hung_requests"] == 1

    started = time.monotonic()
    yield daemons.stop(service)
    assert time.monotonic() - started < 8
    assert zone.states() == ["stopped"]
    assert captured_log.matching("is stopped (stop)")


@pytest_twisted.inlineCallbacks
def test_exit_ends_requests_cleanly(slow_pull_zone, tmp_path):
    zone = slow_pull_zone
    daemons = Daemons(zone, tmp_path)
    service, base_url = yield daemons.start(hold_timeout="30")
    try:
        held = request("POST", f"{base_url}/api/generate", GENERATE)
        yield wait_for_status(base_url, lambda s: s["phase"] == "pulling model")
        stopping = daemons.stop(service)
        code, headers, body = yield held
    finally:
        yield stopping
    assert code == 503
    assert json.loads(body)["error"] == "exoproxy is shutting down"
    assert headers.getRawHeaders(b"retry-after")
    assert zone.states() == ["stopped"]


@pytest_twisted.inlineCallbacks
def test_exit_waits_for_stream(zone, daemons):
    service, base_url, _ = yield ready_daemon(daemons)
    stream = json.dumps({"model": MODEL, "prompt": "a long story " * 20}).encode()

    response = yield treq.post(f"{base_url}/api/generate", data=stream)
    stopping = daemons.stop(service)
    body = yield treq.content(response)
    yield stopping

    lines = body.splitlines()
    assert len(lines) > 3
    assert json.loads(lines[-1])["done"] is True
    assert zone.states() == ["stopped"]


@pytest_twisted.inlineCallbacks
def test_cost_guard_stops_under_load(zone, daemons, captured_log):
    # 0.0005 h is 1.8 s, counted from the start of the cold start.
    _, base_url, instance_id = yield ready_daemon(daemons, max_instance_hours="0.0005")
    status = yield status_of(base_url)
    assert 0 < status["uptime_limit_in"] <= 1.8
    assert "(--max-instance-hours)" in status["next_action"]

    stream = json.dumps({"model": MODEL, "prompt": "a long story " * 40}).encode()
    answers = []

    @inlineCallbacks
    def keep_busy():
        for _ in range(30):
            answer = yield request("POST", f"{base_url}/api/generate", stream)
            answers.append(answer[0])
            current = yield status_of(base_url)
            if current["last_stop_reason"] == "max-instance-hours":
                return

    yield DeferredList([keep_busy(), keep_busy()])
    status = yield wait_for_status(
        base_url, lambda s: s["last_stop_reason"] == "max-instance-hours"
    )
    assert captured_log.matching("(--max-instance-hours); shutting it down")
    assert len(zone.calls("stop-instance")) >= 1
    assert 200 in answers

    # The next request brings the instance up again, with a new uptime limit.
    yield request("POST", f"{base_url}/api/generate", GENERATE)
    status = yield wait_for_status(base_url, state_is("ready"))
    assert status["instance_id"] == instance_id
    assert len(zone.calls("create-instance")) == 1


def spawn_twistd(zone: Zone, tmp_path, port: int, backend_port: int, name: str):
    arguments, environ = daemon_arguments(
        zone,
        tmp_path / "state",
        listen=f"tcp:{port}:interface=127.0.0.1",
        backend_port=str(backend_port),
    )
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY), **environ)
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            twistd_command() + ["--nodaemon", "--pidfile=", "exoproxy", *arguments],
            cwd=tmp_path,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return process, log_path


@inlineCallbacks
def twistd_status(base_url: str):
    try:
        status = yield status_of(base_url)
    except Exception:
        return None
    return status


@pytest_twisted.inlineCallbacks
def test_sigkill_mid_cold_start_adopted(slow_pull_zone, tmp_path):
    zone = slow_pull_zone
    port, backend_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    processes = []
    try:
        first, _ = spawn_twistd(zone, tmp_path, port, backend_port, "first")
        processes.append(first)
        yield wait_until(lambda: twistd_status(base_url), 30, "the first daemon")
        yield request("POST", f"{base_url}/api/generate", GENERATE)

        @inlineCallbacks
        def pulling():
            status = yield twistd_status(base_url)
            return status and status["phase"] == "pulling model"

        yield wait_until(pulling, 20, "the first daemon to wait for the model")
        first.send_signal(signal.SIGKILL)
        yield deferToThread(first.wait, 10)

        second, log_path = spawn_twistd(zone, tmp_path, port, backend_port, "second")
        processes.append(second)

        @inlineCallbacks
        def ready():
            status = yield twistd_status(base_url)
            return status if status and state_is("ready")(status) else None

        status = yield wait_until(ready, 30, "the second daemon to adopt")
        assert [status["instance_id"]] == zone.cloud.faults.created_instances
        assert len(zone.calls("create-instance")) == 1

        second.send_signal(signal.SIGTERM)
        code = yield deferToThread(second.wait, 30)
        assert code in (0, -signal.SIGTERM)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)

    assert zone.states() == ["stopped"]
    log = log_path.read_text()
    assert "Traceback" not in log
    assert zone.secret not in log
    assert "--on-exit stop: instance" in log
