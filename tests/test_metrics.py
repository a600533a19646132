"""
The Prometheus metrics: the hooks with a task.Clock, and `/metrics` of daemons on
the simulated cloud, on the main listener and on --metrics-listen.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater

from exoproxy.metrics import DaemonMetrics, route_label
from tests.daemon import (
    free_port,
    get_json,
    simulated_arguments,
    start_daemon,
    wait_for_status,
)

MODEL = "granite3.1-dense:8b"
GENERATE = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Parse the Prometheus text format into {(sample name, labels): value}.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/", "/"),
        ("/status", "/status"),
        ("/metrics", "/metrics"),
        ("/api/chat", "/api/chat"),
        ("/api/blobs/sha256:" + "0" * 64, "/api/blobs/*"),
        ("/v1/models/granite3.1-dense:8b", "/v1/models/*"),
        ("/v1/models", "/v1/models"),
        ("/wp-admin/login.php", "unmatched"),
        ("/api/chat/extra", "unmatched"),
    ],
)
def test_route_label(path, label):
    assert route_label(path) == label


def registry_value(metrics: DaemonMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_time_to_ready_per_run():
    clock = Clock()
    metrics = DaemonMetrics(clock)

    metrics.phase_changed("provisioning", "finding instance")
    clock.advance(40)
    metrics.phase_changed("provisioning", "waiting for boot")
    clock.advance(80)
    metrics.phase_changed("ready", "ready")
    clock.advance(500)
    metrics.phase_changed("stopping", "stopping")
    metrics.phase_changed("idle", "stopped")
    metrics.phase_changed("provisioning", "finding instance")
    clock.advance(5)
    metrics.phase_changed("error", "error")

    assert registry_value(metrics, "exoproxy_time_to_ready_seconds_count") == 1
    assert registry_value(metrics, "exoproxy_time_to_ready_seconds_sum") == 120
    assert (
        registry_value(metrics, "exoproxy_time_to_ready_seconds_bucket", le="120.0")
        == 1
    )
    assert (
        registry_value(metrics, "exoproxy_time_to_ready_seconds_bucket", le="60.0") == 0
    )
    assert (
        registry_value(
            metrics, "exoproxy_instance_state", exoproxy_instance_state="error"
        )
        == 1
    )
    assert (
        registry_value(
            metrics, "exoproxy_instance_state", exoproxy_instance_state="ready"
        )
        == 0
    )


def test_uptime_counts_ready_and_running():
    clock = Clock()
    metrics = DaemonMetrics(clock)
    running = False
    metrics.watch_instance(lambda: running)

    metrics.phase_changed("provisioning", "creating instance")
    clock.advance(30)
    running = True
    metrics.phase_changed("provisioning", "waiting for ollama")
    clock.advance(20)
    metrics.phase_changed("ready", "ready")
    clock.advance(100)
    metrics.refresh()
    assert registry_value(metrics, "exoproxy_instance_uptime_seconds_total") == 120

    metrics.phase_changed("stopping", "stopping")
    clock.advance(10)
    running = False
    metrics.phase_changed("idle", "stopped")
    clock.advance(1000)
    metrics.refresh()

    assert registry_value(metrics, "exoproxy_instance_uptime_seconds_total") == 130


def test_registries_are_separate():
    first = DaemonMetrics(Clock())
    second = DaemonMetrics(Clock())

    first.api_call_ended("list_instances", "success")
    first.api_call_ended("list_instances", "success")
    second.api_call_ended("list_instances", "timeout")

    assert (
        registry_value(
            first,
            "exoproxy_exoscale_api_calls_total",
            operation="list_instances",
            result="success",
        )
        == 2
    )
    assert (
        registry_value(
            second,
            "exoproxy_exoscale_api_calls_total",
            operation="list_instances",
            result="success",
        )
        is None
    )


@inlineCallbacks
def scrape(url: str):
    response = yield treq.get(url)
    body = yield treq.content(response)
    return response, body.decode("utf-8")


@pytest_twisted.inlineCallbacks
def test_metrics_never_wake_instance():
    service, base_url = yield start_daemon(simulated_arguments())
    try:
        last_activity = service.activity.last_activity
        for _ in range(3):
            response, text = yield scrape(f"{base_url}/metrics")
            assert response.code == 200
        yield sleep(0.3)

        assert response.headers.getRawHeaders(b"content-type")[0].startswith(
            b"text/plain"
        )
        assert service.simulator.cloud.calls == []
        assert service.lifecycle.state == "idle"
        assert service.activity.last_activity == last_activity
        found = samples(text)
        assert value(found, "exoproxy_instance_state", exoproxy_instance_state="idle")
        assert value(found, "exoproxy_http_requests_in_flight") == 1
        assert value(found, "exoproxy_held_requests") == 0
        assert value(found, "process_cpu_seconds_total") is not None

        response = yield treq.post(f"{base_url}/metrics", data=b"")
        yield treq.content(response)
        assert response.code == 405
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_metrics_after_cold_start():
    service, base_url = yield start_daemon(
        simulated_arguments(hold_timeout=600, idle_timeout=60)
    )
    try:
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        body = yield treq.content(response)
        assert response.code == 200
        yield sleep(0.2)
        _, text = yield scrape(f"{base_url}/metrics")
    finally:
        yield service.stopService()

    found = samples(text)
    assert (
        value(
            found, "exoproxy_http_requests_total", route="/api/generate", status="200"
        )
        == 1
    )
    assert value(found, "exoproxy_time_to_ready_seconds_count") == 1
    assert value(found, "exoproxy_time_to_ready_seconds_sum") > 0
    assert value(found, "exoproxy_instance_state", exoproxy_instance_state="ready") == 1
    assert value(found, "exoproxy_instance_uptime_seconds_total") > 0
    assert (
        value(
            found,
            "exoproxy_exoscale_api_calls_total",
            operation="create_instance",
            result="success",
        )
        == 1
    )
    assert value(found, "exoproxy_upstream_bytes_total") == len(body)
    assert value(found, "exoproxy_held_requests") == 0


@pytest_twisted.inlineCallbacks
def test_held_requests_gauge():
    service, base_url = yield start_daemon(
        simulated_arguments(hold_timeout=600, simulate_boot_delay=1)
    )
    try:
        waiting = [
            treq.post(f"{base_url}/api/generate", data=GENERATE) for _ in range(3)
        ]
        yield sleep(0.4)
        _, text = yield scrape(f"{base_url}/metrics")
        for answer in waiting:
            response = yield answer
            yield treq.content(response)
    finally:
        yield service.stopService()

    assert value(samples(text), "exoproxy_held_requests") == 3


@pytest_twisted.inlineCallbacks
def test_metrics_listen_separate():
    metrics_port = free_port()
    service, base_url = yield start_daemon(
        simulated_arguments()
        + ["--metrics-listen", f"tcp:{metrics_port}:interface=127.0.0.1"]
    )
    try:
        bound = [port.getHost().port for port in service.metrics_ports]
        on_main, _ = yield scrape(f"{base_url}/metrics")
        on_metrics, text = yield scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        elsewhere, _ = yield scrape(f"http://127.0.0.1:{metrics_port}/status")
        code, _ = yield get_json(f"{base_url}/status")
    finally:
        yield service.stopService()

    assert on_main.code == 404
    assert on_metrics.code == 200
    assert elsewhere.code == 404
    assert code == 200
    assert bound == [metrics_port]
    assert service.metrics_ports == []
    found = samples(text)
    assert (
        value(found, "exoproxy_http_requests_total", route="/metrics", status="404")
        == 1
    )


@pytest_twisted.inlineCallbacks
def test_two_daemons_count_apart():
    first, first_url = yield start_daemon(simulated_arguments())
    second, second_url = yield start_daemon(simulated_arguments())
    try:
        for _ in range(3):
            yield get_json(f"{first_url}/status")
        yield get_json(f"{second_url}/status")
        _, first_text = yield scrape(f"{first_url}/metrics")
        _, second_text = yield scrape(f"{second_url}/metrics")
    finally:
        yield first.stopService()
        yield second.stopService()

    status = {"route": "/status", "status": "200"}
    assert value(samples(first_text), "exoproxy_http_requests_total", **status) == 3
    assert value(samples(second_text), "exoproxy_http_requests_total", **status) == 1


@pytest_twisted.inlineCallbacks
def test_instance_state_follows_idle_stop():
    service, base_url = yield start_daemon(simulated_arguments(idle_timeout=1))
    try:
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        yield treq.content(response)
        yield wait_for_status(
            base_url, lambda status: status["instance_status"] == "stopped"
        )
        _, text = yield scrape(f"{base_url}/metrics")
    finally:
        yield service.stopService()

    found = samples(text)
    assert value(found, "exoproxy_instance_state", exoproxy_instance_state="idle") == 1
    assert (
        value(
            found,
            "exoproxy_exoscale_api_calls_total",
            operation="stop_instance",
            result="success",
        )
        == 1
    )
