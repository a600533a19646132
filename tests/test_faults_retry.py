"""
Unit tests of the retry policy, the sorting of failed API calls, the redaction of
their messages, and the retries of ExoscaleCloud.call, with a task.Clock and a
thread runner that returns results from a script.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
import requests
from exoscale.api.exceptions import (
    ExoscaleAPIAuthException,
    ExoscaleAPIClientException,
    ExoscaleAPIServerException,
)
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from exoproxy.api_errors import ApiCallFailed, describe_failure, redact
from exoproxy.cloud import ExoscaleCloud, OperationFailed, OperationTimedOut
from exoproxy.retry import MAX_RETRY_AFTER, RetryPolicy, parse_retry_after

SECRET = "a-very-secret-value"


def response(status: int, body: Any, headers: dict[str, str] | None = None):
    answer = requests.models.Response()
    answer.status_code = status
    answer._content = json.dumps(body).encode() if not isinstance(body, bytes) else body
    answer.headers.update(headers or {})
    return answer


def describe(error: Exception, operation: str = "list_instances") -> ApiCallFailed:
    try:
        raise error
    except Exception:
        return describe_failure(operation, Failure(), secrets=[SECRET], now=1000.0)


@pytest.mark.parametrize("attempt", range(1, 12))
def test_delay_within_jittered_backoff(attempt):
    policy = RetryPolicy(initial_delay=1, max_delay=30, factor=2)
    backoff = min(2 ** (attempt - 1), 30)
    low = RetryPolicy(initial_delay=1, max_delay=30, jitter=lambda: 0.0)
    high = RetryPolicy(initial_delay=1, max_delay=30, jitter=lambda: 0.999999)
    assert low.delay(attempt) == pytest.approx(backoff / 2)
    assert high.delay(attempt) == pytest.approx(backoff, rel=1e-5)
    assert backoff / 2 <= policy.delay(attempt) <= backoff


def test_retry_after_is_lower_bound():
    policy = RetryPolicy(initial_delay=1, max_delay=30, jitter=lambda: 0.0)
    assert policy.delay(1, retry_after=7) == 7
    assert policy.delay(6, retry_after=1) == 15
    assert policy.delay(1, retry_after=10**6) == MAX_RETRY_AFTER


def test_retry_after_parsed():
    now = 1_700_000_000.0
    later = datetime.fromtimestamp(now, tz=timezone.utc) + timedelta(seconds=42)
    earlier = later - timedelta(hours=1)
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(" 12 ", now) == 12.0
    assert parse_retry_after(format_datetime(later, usegmt=True), now) == 42.0
    assert parse_retry_after(format_datetime(earlier, usegmt=True), now) == 0.0
    for invalid in (None, "", "soon", "-3", "1.5"):
        assert parse_retry_after(invalid, now) is None


def test_forbidden_is_permanent():
    error = describe(
        ExoscaleAPIAuthException("x", response(403, {"message": "Invalid signature"}))
    )
    assert error.status == 403
    assert error.transient is False
    assert str(error).startswith("list-instances failed: HTTP 403: Invalid signature")
    assert "check the API key" in str(error)


@pytest.mark.parametrize(
    "status, transient, maybe_applied",
    [(400, False, False), (404, False, False), (409, False, False)]
    + [(408, True, True), (500, True, True), (502, True, True), (503, True, True)],
)
def test_status_sorted(status, transient, maybe_applied):
    kind = ExoscaleAPIServerException if status >= 500 else ExoscaleAPIClientException
    error = describe(kind("x", response(status, {"message": "nope"})))
    assert error.status == status
    assert error.transient is transient
    assert error.maybe_applied is maybe_applied
    assert error.detail == f"HTTP {status}: nope"


def test_rate_limit_not_applied_and_waits():
    error = describe(
        ExoscaleAPIClientException(
            "x", response(429, {"message": "slow down"}, {"Retry-After": "3"})
        )
    )
    assert error.transient is True
    assert error.maybe_applied is False
    assert error.retry_after == 3.0


def test_refused_connection_not_applied():
    refused = MaxRetryError(None, "/v2/instance", NewConnectionError(None, "refused"))
    error = describe(requests.exceptions.ConnectionError(refused))
    assert error.transient is True
    assert error.maybe_applied is False


def test_dropped_connection_maybe_applied():
    dropped = ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
    error = describe(requests.exceptions.ConnectionError(dropped))
    assert error.transient is True
    assert error.maybe_applied is True
    assert error.detail.startswith("connection failed: ")


@pytest.mark.parametrize(
    "raised",
    [
        requests.exceptions.ReadTimeout("read timed out"),
        TimeoutError(),
        requests.exceptions.JSONDecodeError("Expecting value", "<html>", 0),
    ],
)
def test_lost_answer_maybe_applied(raised):
    error = describe(raised)
    assert error.transient is True
    assert error.maybe_applied is True


def test_bug_is_permanent():
    error = describe(KeyError("reason"))
    assert error.transient is False
    assert error.detail == "unexpected KeyError: 'reason'"


def test_messages_redacted():
    header = "EXO2-HMAC-SHA256 credential=EXOkey,expires=1,signature=abc+/d=="
    body = {"message": f"echo {SECRET} and {header}"}
    error = describe(ExoscaleAPIClientException("x", response(400, body)))
    assert SECRET not in str(error)
    assert "abc+/d" not in str(error)
    assert "EXO2-HMAC-SHA256 [redacted]" in str(error)
    assert redact("signature=xyz= rest", []) == "signature=[redacted] rest"


class ScriptedRunner:
    """
    Return the result of each SDK call from a list per method: a value, an
    exception, or a Deferred that the test fires.
    """

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = script
        self.calls: list[str] = []

    def __call__(self, method, **arguments):
        self.calls.append(method.__name__)
        answer = self.script[method.__name__].pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def make_cloud(script: dict[str, list[Any]], **policy: Any):
    clock = Clock()
    runner = ScriptedRunner(script)
    cloud = ExoscaleCloud(
        None,
        clock,
        api_url="http://127.0.0.1:1/v2",
        api_key="EXOtest",
        api_secret=SECRET,
        timeout=5,
        max_threads=1,
        poll_interval=1,
        run_in_thread=runner,
        retry_policy=RetryPolicy(jitter=lambda: 0.0, **policy),
    )
    return clock, runner, cloud


def server_error(status: int = 503) -> Exception:
    return ExoscaleAPIServerException("x", response(status, {"message": "busy"}))


def test_call_retries_transient_errors():
    clock, runner, cloud = make_cloud(
        {"list_instances": [server_error(), server_error(), {"instances": []}]}
    )
    results: list[Any] = []
    cloud.call("list_instances").addBoth(results.append)

    assert results == []
    assert cloud.pending_retry().operation == "list-instances"
    assert cloud.pending_retry().attempt == 1
    clock.advance(0.5)
    assert cloud.pending_retry().attempt == 2
    clock.advance(1)
    assert results == [{"instances": []}]
    assert cloud.pending_retry() is None
    assert runner.calls == ["list_instances"] * 3


def test_call_gives_up_after_attempts():
    clock, runner, cloud = make_cloud(
        {"list_instances": [server_error()] * 3}, attempts=3
    )
    results: list[Any] = []
    cloud.call("list_instances").addBoth(results.append)
    for _ in range(10):
        clock.advance(1)
    assert results[0].check(ApiCallFailed)
    assert "HTTP 503: busy" in results[0].getErrorMessage()
    assert len(runner.calls) == 3


def test_create_not_retried_when_maybe_applied():
    clock, runner, cloud = make_cloud({"create_instance": [server_error(), {}]})
    results: list[Any] = []
    cloud.call("create_instance").addBoth(results.append)
    assert results[0].value.maybe_applied is True
    assert runner.calls == ["create_instance"]


def test_cancelled_call_drained_later():
    in_flight: Deferred[Any] = Deferred()
    clock, _, cloud = make_cloud({"list_instances": [in_flight]})
    called = cloud.call("list_instances")
    called.addErrback(lambda failure: None)
    called.cancel()
    assert cloud.calls_in_flight == 1

    drained: list[Any] = []
    cloud.drain(60).addCallback(drained.append)
    assert drained == []
    in_flight.callback({"instances": []})
    assert drained == [None]
    assert cloud.calls_in_flight == 0
    assert clock.getDelayedCalls() == []


def test_drain_bounded():
    clock, _, cloud = make_cloud({"list_instances": [Deferred()]})
    cloud.call("list_instances").addErrback(lambda failure: None)
    drained: list[Any] = []
    cloud.drain(3).addCallback(drained.append)
    clock.advance(3)
    assert drained == [None]


def pending(operation_id: str = "op-1") -> dict[str, Any]:
    return {"id": operation_id, "state": "pending", "reference": {"id": "i-1"}}


def test_operation_failure_without_reason():
    clock, _, cloud = make_cloud(
        {"get_operation": [{"id": "op-1", "state": "failure"}]}
    )
    results: list[Any] = []
    cloud.wait_for_operation(pending()).addBoth(results.append)
    clock.advance(1)
    assert results[0].check(OperationFailed)
    assert results[0].getErrorMessage().endswith("ended in failure: no reason given")


def test_pending_operation_bounded():
    clock, runner, cloud = make_cloud({"get_operation": [pending()] * 10})
    results: list[Any] = []
    cloud.wait_for_operation(pending(), timeout=3).addBoth(results.append)
    for _ in range(5):
        clock.advance(1)
    assert results[0].check(OperationTimedOut)
    assert clock.getDelayedCalls() == []


def test_cancelled_wait_stops_polling():
    clock, runner, cloud = make_cloud({"get_instance": [{"state": "starting"}] * 10})
    waiting = cloud.wait_for_instance_state("i-1", {"running"})
    waiting.addErrback(lambda failure: None)
    clock.advance(1)
    waiting.cancel()
    polls = len(runner.calls)
    clock.advance(5)
    assert len(runner.calls) == polls
    assert clock.getDelayedCalls() == []
