"""
The HTML `/status` page: content negotiation, escaping, the self-refresh during a
cold start, and the page of a daemon on the simulated cloud.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from exoproxy.status_page import prefers_html, render_status_page
from tests.daemon import simulated_arguments, start_daemon, wait_for_status

BROWSER = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
MODEL = "granite3.1-dense:8b"
GENERATE = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()


def request_accepting(accept: bytes | None) -> DummyRequest:
    request = DummyRequest([b"status"])
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    return request


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER, True),
        (b"text/html", True),
        (b"*/*", False),
        (None, False),
        (b"application/json", False),
        (b"application/json, text/html;q=0.5", False),
        (b"text/html;q=0.5, application/json;q=0.9", False),
        (b"text/*, application/json;q=0.2", True),
        (b"text/html;q=0, */*", False),
        (b"text/html;q=bogus, */*;q=0.1", False),
    ],
)
def test_prefers_html(accept, html):
    assert prefers_html(request_accepting(accept)) is html


def status(**fields) -> dict:
    base = {
        "service": "exoproxy",
        "provisioning_status": "idle",
        "phase": "idle",
        "phase_seconds": 12.0,
        "idle_timeout": 1800,
        "idle_action": "stop",
        "ollama_model": MODEL,
        "zone": "at-vie-2",
        "instance_type": "gpua5000.small",
        "requests_in_flight": 0,
        "mode": "exoscale",
        "simulated": False,
    }
    base.update(fields)
    return base


def test_page_escapes_values():
    page = render_status_page(
        status(
            provisioning_status="error",
            phase="error",
            error='<script>alert("x")</script> & more',
            instance_id="<b>i-1</b>",
        )
    ).decode()

    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    assert "&lt;b&gt;i-1&lt;/b&gt;" in page


def test_page_needs_no_external_assets():
    page = render_status_page(status()).decode()

    assert "<script" not in page
    assert "<link" not in page
    assert "src=" not in page
    assert "<style>" in page


@pytest.mark.parametrize(
    ("state", "phase", "refreshes"),
    [
        ("provisioning", "waiting for boot", True),
        ("stopping", "stopping", True),
        ("idle", "idle", False),
        ("ready", "ready", False),
        ("error", "error", False),
    ],
)
def test_page_refreshes_only_while_changing(state, phase, refreshes):
    page = render_status_page(status(provisioning_status=state, phase=phase)).decode()

    assert ('http-equiv="refresh"' in page) is refreshes


def test_page_shows_phase_and_next_step():
    page = render_status_page(
        status(
            provisioning_status="provisioning",
            phase="waiting for boot",
            phase_seconds=75.4,
        )
    ).decode()

    assert "<td>waiting for boot</td>" in page
    assert "<td>1 min 15 s</td>" in page
    assert "Wait for Ollama on the instance to answer." in page


def test_page_prefers_next_action():
    page = render_status_page(
        status(
            provisioning_status="provisioning",
            phase="waiting for boot",
            next_action="waiting for boot; the ready timeout passes in 1700 s",
        )
    ).decode()

    assert "<td>Waiting for boot; the ready timeout passes in 1700 s</td>" in page
    assert "Wait for Ollama on the instance to answer." not in page


def test_page_idle_countdown():
    counting = render_status_page(
        status(provisioning_status="ready", phase="ready", idle_stop_in=125.0)
    ).decode()
    paused = render_status_page(
        status(provisioning_status="ready", phase="ready", idle_stop_in=None)
    ).decode()

    assert "<th>Idle countdown</th><td>2 min 05 s</td>" in counting
    assert "The instance stops in 2 min 05 s unless a request arrives." in counting
    assert "paused while requests are in flight" in paused


def test_page_retry_countdown():
    page = render_status_page(
        status(provisioning_status="error", phase="error", error="quota", retry_in=40)
    ).decode()

    assert "A request after 40 s tries again." in page
    assert "<td>quota</td>" in page


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_status_page_through_cold_start():
    service, base_url = yield start_daemon(
        simulated_arguments(hold_timeout=600, simulate_boot_delay=1, idle_timeout=60)
    )
    browser = Headers({b"accept": [BROWSER]})
    try:
        response = yield treq.get(f"{base_url}/status", headers=browser)
        idle_page = (yield treq.content(response)).decode()
        assert response.headers.getRawHeaders(b"content-type") == [
            b"text/html; charset=utf-8"
        ]
        assert response.headers.getRawHeaders(b"vary") == [b"Accept"]

        held = treq.post(f"{base_url}/api/generate", data=GENERATE)
        yield sleep(0.3)
        response = yield treq.get(f"{base_url}/status", headers=browser)
        provisioning_page = (yield treq.content(response)).decode()

        answer = yield held
        yield treq.content(answer)
        yield wait_for_status(
            base_url, lambda status: status["provisioning_status"] == "ready"
        )
        response = yield treq.get(f"{base_url}/status", headers=browser)
        ready_page = (yield treq.content(response)).decode()

        response = yield treq.get(f"{base_url}/status")
        document = json.loads((yield treq.content(response)))
    finally:
        yield service.stopService()

    assert 'class="state idle"' in idle_page
    assert 'http-equiv="refresh"' not in idle_page
    assert 'class="state provisioning"' in provisioning_page
    assert 'http-equiv="refresh"' in provisioning_page
    assert 'class="state ready"' in ready_page
    assert "<th>Idle countdown</th>" in ready_page
    assert 'http-equiv="refresh"' not in ready_page
    assert document["provisioning_status"] == "ready"
