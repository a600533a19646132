"""
Unit tests of the lifecycle's fault transitions, with a task.Clock and a
provisioner whose Deferreds the test fires: adoption, a lost backend, the uptime
guard, the backoff of a failed stop, and the shutdown.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from exoproxy.api_errors import ApiCallFailed
from exoproxy.lifecycle import InstanceLifecycle
from exoproxy.lifecycle_interfaces import (
    STOPPED_FOR_UPTIME,
    Backend,
    ShuttingDown,
)

BACKEND = Backend(url="https://127.0.0.2:11443", instance_id="i-1")


class Run:
    def __init__(self, needed, previous) -> None:
        self.deferred: Deferred[Backend | None] = Deferred()
        self.needed = needed
        self.previous = previous


class ScriptedProvisioner:
    """
    A provisioner whose runs and stops end when the test fires them.
    """

    def __init__(self) -> None:
        self.runs: list[Run] = []
        self.stops: list[tuple[str, Deferred[None]]] = []
        self.instance_id: str | None = None

    def bring_up(self, set_phase, needed=None, previous=None):
        set_phase("finding instance")
        self.runs.append(Run(needed, previous))
        return self.runs[-1].deferred

    def shut_down(self, instance_id):
        self.stops.append((instance_id, Deferred()))
        return self.stops[-1][1]

    def known_instance_id(self):
        return self.instance_id


def make_lifecycle(**options: Any):
    clock = Clock()
    clock.advance(1000)
    provisioner = ScriptedProvisioner()
    demands: list[None] = []
    lifecycle = InstanceLifecycle(
        clock,
        provisioner,
        retry_delay=lambda attempt: 10.0 * attempt,
        on_demand=lambda: demands.append(None),
        **options,
    )
    return clock, provisioner, lifecycle, demands


def ready(lifecycle: InstanceLifecycle, provisioner: ScriptedProvisioner) -> None:
    lifecycle.demand()
    provisioner.instance_id = BACKEND.instance_id
    provisioner.runs[-1].deferred.callback(BACKEND)
    assert lifecycle.state == "ready"


def test_adoption_without_instance_goes_idle():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.adopt()
    assert lifecycle.state == "provisioning"
    assert provisioner.runs[0].needed() is False

    provisioner.runs[0].deferred.callback(None)
    assert lifecycle.state == "idle"
    assert lifecycle.phase == "idle"
    assert lifecycle.error is None


def test_demand_during_adoption_is_wanted():
    _, provisioner, lifecycle, demands = make_lifecycle()
    lifecycle.adopt()
    lifecycle.demand()
    assert provisioner.runs[0].needed() is True
    assert len(provisioner.runs) == 1
    assert demands == [None]


def test_adoption_of_running_instance_ready():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.adopt()
    provisioner.runs[0].deferred.callback(BACKEND)
    assert lifecycle.state == "ready"
    assert lifecycle.current_backend() == BACKEND


def test_lost_backend_is_checked():
    _, provisioner, lifecycle, _ = make_lifecycle()
    ready(lifecycle, provisioner)

    lifecycle.backend_failed("https://127.0.0.9:11443", "an earlier backend")
    assert lifecycle.state == "ready"

    lifecycle.backend_failed(BACKEND.url, "connection refused")
    assert lifecycle.state == "provisioning"
    assert lifecycle.current_backend() is None
    check = provisioner.runs[-1]
    assert check.previous == BACKEND
    assert check.needed() is False

    lifecycle.backend_failed(BACKEND.url, "again")
    assert len(provisioner.runs) == 2

    check.deferred.callback(BACKEND)
    assert lifecycle.state == "ready"


def test_lost_backend_gone_goes_idle():
    _, provisioner, lifecycle, _ = make_lifecycle()
    ready(lifecycle, provisioner)
    lifecycle.backend_failed(BACKEND.url, "connection refused")
    provisioner.instance_id = None
    provisioner.runs[-1].deferred.callback(None)
    assert lifecycle.state == "idle"
    assert lifecycle.instance_id is None


def test_uptime_guard_stops_under_load():
    clock, provisioner, lifecycle, _ = make_lifecycle(max_uptime=100)
    lifecycle.demand()
    clock.advance(30)
    provisioner.instance_id = BACKEND.instance_id
    provisioner.runs[0].deferred.callback(BACKEND)

    clock.advance(69)
    assert lifecycle.state == "ready"
    clock.advance(1)
    assert lifecycle.state == "stopping"
    assert lifecycle.stop_reason == STOPPED_FOR_UPTIME
    assert [instance for instance, _ in provisioner.stops] == ["i-1"]

    provisioner.stops[0][1].callback(None)
    assert lifecycle.state == "idle"
    assert lifecycle.stop_reason == STOPPED_FOR_UPTIME
    assert lifecycle.up_since is None


def test_uptime_guard_off_by_default():
    clock, provisioner, lifecycle, _ = make_lifecycle()
    ready(lifecycle, provisioner)
    clock.advance(10**7)
    assert lifecycle.state == "ready"
    assert clock.getDelayedCalls() == []


def test_uptime_counts_across_backend_check():
    clock, provisioner, lifecycle, _ = make_lifecycle(max_uptime=100)
    ready(lifecycle, provisioner)
    clock.advance(60)
    lifecycle.backend_failed(BACKEND.url, "broken stream")
    clock.advance(10)
    provisioner.runs[-1].deferred.callback(BACKEND)
    clock.advance(29)
    assert lifecycle.state == "ready"
    clock.advance(1)
    assert lifecycle.state == "stopping"


def test_failed_stop_backs_off():
    clock, provisioner, lifecycle, _ = make_lifecycle()
    ready(lifecycle, provisioner)
    lifecycle.inputs.idle_expired()
    provisioner.stops[0][1].errback(Failure(RuntimeError("API down")))
    assert lifecycle.state == "error"
    assert lifecycle.stop_retry_at == clock.seconds() + 10

    lifecycle.inputs.idle_expired()
    assert len(provisioner.stops) == 1
    clock.advance(10)
    lifecycle.inputs.idle_expired()
    assert lifecycle.state == "stopping"
    assert len(provisioner.stops) == 2

    provisioner.stops[1][1].errback(Failure(RuntimeError("API down")))
    assert lifecycle.stop_retry_at == clock.seconds() + 20


def test_stopped_instance_not_stopped_again():
    clock, provisioner, lifecycle, _ = make_lifecycle(
        may_be_running=lambda instance_id: False
    )
    lifecycle.demand()
    provisioner.instance_id = "i-1"
    provisioner.runs[0].deferred.errback(Failure(RuntimeError("not ready")))
    lifecycle.inputs.idle_expired()
    clock.advance(0)
    assert lifecycle.state == "idle"
    assert lifecycle.phase == "stopped"
    assert provisioner.stops == []
    assert lifecycle.stop_reason is None


def test_permanent_error_flagged():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].deferred.errback(
        Failure(ApiCallFailed("list_instances", "HTTP 403: denied", status=403))
    )
    assert lifecycle.error == "list-instances failed: HTTP 403: denied"
    assert lifecycle.error_is_permanent is True


def test_transient_error_not_flagged():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    provisioner.runs[0].deferred.errback(
        Failure(ApiCallFailed("list_instances", "HTTP 503", transient=True))
    )
    assert lifecycle.error_is_permanent is False


def test_close_fails_waiters_and_runs():
    clock, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.demand()
    waiter = lifecycle.wait_until_ready()
    failures: list[Failure] = []
    waiter.addErrback(failures.append)

    lifecycle.close()
    # Waiters fire on the next reactor turn, outside the transition.
    clock.advance(0)
    assert lifecycle.state == "error"
    assert lifecycle.error == "exoproxy is shutting down"
    assert failures[0].check(ShuttingDown)

    lifecycle.demand()
    assert len(provisioner.runs) == 1
    late = lifecycle.wait_until_ready()
    late_failures: list[Failure] = []
    late.addErrback(late_failures.append)
    assert late_failures[0].check(ShuttingDown)


def test_close_cancels_stop():
    _, provisioner, lifecycle, _ = make_lifecycle()
    ready(lifecycle, provisioner)
    lifecycle.inputs.idle_expired()
    lifecycle.close()
    assert lifecycle.state == "error"
    assert "shutting down" in lifecycle.error


@pytest.mark.parametrize("state", ["idle", "ready"])
def test_close_cancels_uptime_guard(state):
    clock, provisioner, lifecycle, _ = make_lifecycle(max_uptime=100)
    if state == "ready":
        ready(lifecycle, provisioner)
    lifecycle.close()
    assert clock.getDelayedCalls() == []


def test_demand_after_close_fails_at_once():
    _, provisioner, lifecycle, _ = make_lifecycle()
    lifecycle.close()
    lifecycle.demand()
    assert lifecycle.state == "error"
    assert lifecycle.error == "exoproxy is shutting down"
    assert provisioner.runs == []
