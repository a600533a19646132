"""
Unit tests of the lifecycle state machine, driven by a task.Clock and a provisioner
whose Deferreds the test fires.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from exoproxy.activity import ActivityTracker
from exoproxy.lifecycle import InstanceLifecycle, retry_backoff
from exoproxy.lifecycle_interfaces import Backend

BACKEND = Backend(url="http://127.0.0.2:11434", instance_id="i-1")


class ControlledProvisioner:
    """
    A provisioner whose runs and shutdowns end when the test fires them.
    """

    def __init__(self) -> None:
        self.runs: list[Deferred[Backend]] = []
        self.shutdowns: list[tuple[str, Deferred[None]]] = []
        self.phases: list[str] = []
        self.instance_id: str | None = None

    def bring_up(self, set_phase):
        set_phase("finding instance")
        self.phases.append("finding instance")
        self.runs.append(Deferred())
        return self.runs[-1]

    def shut_down(self, instance_id):
        self.shutdowns.append((instance_id, Deferred()))
        return self.shutdowns[-1][1]

    def known_instance_id(self):
        return self.instance_id


def make_lifecycle():
    clock = Clock()
    clock.advance(1000)
    provisioner = ControlledProvisioner()
    ready: list[Backend] = []
    lifecycle = InstanceLifecycle(clock, provisioner, on_ready=ready.append)
    return clock, provisioner, lifecycle, ready


def test_starts_idle():
    _, provisioner, lifecycle, _ = make_lifecycle()
    assert lifecycle.state == "idle"
    assert lifecycle.current_backend() is None
    assert provisioner.runs == []


def test_demand_starts_one_run():
    _, provisioner, lifecycle, _ = make_lifecycle()
    for _ in range(50):
        lifecycle.demand()
    assert lifecycle.state == "provisioning"
    assert len(provisioner.runs) == 1
    assert lifecycle.phase == "finding instance"
    assert lifecycle.current_backend() is None


def test_run_success_makes_ready():
    _, provisioner, lifecycle, ready = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].callback(BACKEND)
    assert lifecycle.state == "ready"
    assert lifecycle.current_backend() == BACKEND
    assert lifecycle.instance_id == "i-1"
    assert ready == [BACKEND]
    lifecycle.demand()
    assert len(provisioner.runs) == 1


def test_run_failure_records_error():
    clock, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].errback(Failure(RuntimeError("quota exceeded")))
    assert lifecycle.state == "error"
    assert lifecycle.error == "quota exceeded"
    assert lifecycle.retry_at == clock.seconds() + retry_backoff(1)
    assert lifecycle.current_backend() is None


def test_error_retries_after_backoff():
    clock, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].errback(Failure(RuntimeError("boom")))

    lifecycle.demand()
    assert lifecycle.state == "error"
    assert len(provisioner.runs) == 1

    clock.advance(retry_backoff(1))
    lifecycle.demand()
    assert lifecycle.state == "provisioning"
    assert len(provisioner.runs) == 2
    assert lifecycle.error is None


def test_backoff_grows_and_is_capped():
    assert retry_backoff(1) == 10
    assert retry_backoff(2) == 20
    assert retry_backoff(3) == 40
    assert retry_backoff(30) == 600


def test_second_failure_doubles_backoff():
    clock, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].errback(Failure(RuntimeError("first")))
    clock.advance(retry_backoff(1))
    lifecycle.demand()
    provisioner.runs[1].errback(Failure(RuntimeError("second")))
    assert lifecycle.retry_at == clock.seconds() + retry_backoff(2)


def test_idle_expiry_stops_ready_instance():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.instance_id = "i-1"
    provisioner.runs[0].callback(BACKEND)

    lifecycle.inputs.idle_expired()
    assert lifecycle.state == "stopping"
    assert lifecycle.current_backend() is None
    assert [instance for instance, _ in provisioner.shutdowns] == ["i-1"]

    provisioner.shutdowns[0][1].callback(None)
    assert lifecycle.state == "idle"
    assert lifecycle.phase == "stopped"


def test_idle_destroy_forgets_instance():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.instance_id = "i-1"
    provisioner.runs[0].callback(BACKEND)

    lifecycle.inputs.idle_expired()
    provisioner.instance_id = None
    provisioner.shutdowns[0][1].callback(None)

    assert lifecycle.state == "idle"
    assert lifecycle.phase == "idle"
    assert lifecycle.instance_id is None


def test_idle_expiry_ignored_while_not_serving():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.inputs.idle_expired()
    assert lifecycle.state == "idle"
    lifecycle.demand()
    lifecycle.inputs.idle_expired()
    assert lifecycle.state == "provisioning"
    assert provisioner.shutdowns == []


def test_demand_while_stopping_restarts():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].callback(BACKEND)
    lifecycle.inputs.idle_expired()

    lifecycle.demand()
    assert lifecycle.state == "stopping"
    assert len(provisioner.runs) == 1

    provisioner.shutdowns[0][1].callback(None)
    assert lifecycle.state == "provisioning"
    assert len(provisioner.runs) == 2


def test_stop_failure_is_error():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].callback(BACKEND)
    lifecycle.inputs.idle_expired()
    provisioner.shutdowns[0][1].errback(Failure(RuntimeError("api down")))
    assert lifecycle.state == "error"
    assert "api down" in lifecycle.error


def test_error_with_instance_is_stopped_when_idle():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.instance_id = "i-7"
    provisioner.runs[0].errback(Failure(RuntimeError("ollama never came up")))

    lifecycle.inputs.idle_expired()
    assert lifecycle.state == "stopping"
    assert [instance for instance, _ in provisioner.shutdowns] == ["i-7"]


def test_error_without_instance_goes_idle():
    clock, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].errback(Failure(RuntimeError("bad credentials")))
    lifecycle.inputs.idle_expired()
    clock.advance(0)
    assert lifecycle.state == "idle"
    assert provisioner.shutdowns == []


def test_cancel_ends_run_in_error():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    lifecycle.cancel()
    assert lifecycle.state == "error"


def test_activity_idle_time():
    clock = Clock()
    activity = ActivityTracker(clock)
    clock.advance(5)
    assert activity.idle_for() == 5

    activity.request_started()
    clock.advance(100)
    assert activity.idle_for() == 0

    activity.request_finished()
    assert activity.idle_for() == 0
    clock.advance(7)
    assert activity.idle_for() == 7
