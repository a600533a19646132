"""
The JSON log format, the redaction of request targets and the access log of a
daemon on the simulated cloud.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.application.service import Application, MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from exoproxy.access_log import looks_like_token, redact_target
from exoproxy.config import ConfigError
from exoproxy.logs import (
    format_json_line,
    give_observer_to_twistd,
    json_observer,
    json_record,
    parse_log_format,
)
from exoproxy.tap import Options
from tests.daemon import free_port, simulated_arguments, start_daemon

REPOSITORY = Path(__file__).resolve().parent.parent
MODEL = "granite3.1-dense:8b"
GENERATE = json.dumps({"model": MODEL, "prompt": "hi", "stream": False}).encode()


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def captured():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def logged_event(emit) -> dict:
    """
    Return the one event that C{emit(logger)} logs.
    """
    events: list[dict] = []
    logger = Logger(namespace="exoproxy.test", observer=events.append)
    emit(logger)
    [event] = events
    return event


def test_json_record_fields():
    event = logged_event(
        lambda log: log.warn(
            "Instance {instance_id} took {seconds} s", instance_id="i-1", seconds=3.5
        )
    )

    record = json_record(event)

    assert list(record)[:4] == ["time", "level", "namespace", "message"]
    assert record["level"] == "warn"
    assert record["namespace"] == "exoproxy.test"
    assert record["message"] == "Instance i-1 took 3.5 s"
    assert record["instance_id"] == "i-1"
    assert record["seconds"] == 3.5
    assert record["time"].endswith("Z")
    assert not [key for key in record if key.startswith("log_")]


def test_json_record_reserved_names_kept():
    event = logged_event(
        lambda log: log.info("{message} at {time}", message="hello", time="noon")
    )

    record = json_record(event)

    assert record["message"] == "hello at noon"
    assert record["field_message"] == "hello"
    assert record["field_time"] == "noon"
    assert record["time"] != "noon"


def test_json_record_redacts_secret_fields():
    event = logged_event(
        lambda log: log.info(
            "configured",
            api_secret="very-secret",
            authorization="Bearer abc",
            prompt_tokens=12,
        )
    )

    record = json_record(event)

    assert record["api_secret"] == "[redacted]"
    assert record["authorization"] == "[redacted]"
    assert record["prompt_tokens"] == 12
    assert "very-secret" not in format_json_line(event)


def test_json_record_failure():
    try:
        raise ValueError("broken backend")
    except ValueError:
        failure = Failure()
    event = logged_event(lambda log: log.failure("Proxying failed", failure))

    record = json_record(event)

    assert record["level"] == "critical"
    assert record["message"] == "Proxying failed"
    assert record["error"] == "broken backend"
    assert "ValueError" in record["traceback"]


def test_json_record_legacy_event(captured):
    legacy_log.msg("Site starting on 8080")

    [event] = [e for e in captured if "Site starting" in str(e.get("message"))]
    record = json_record(event)

    assert record["message"] == "Site starting on 8080"
    assert record["level"] == "info"
    assert record["namespace"] == "log_legacy"
    assert "isError" not in record
    assert "field_message" not in record


def test_json_line_is_one_line():
    event = logged_event(
        lambda log: log.info("multi\nline {thing}", thing=object(), kind=LogLevel)
    )

    line = format_json_line(event)

    assert line.endswith("\n")
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["message"].startswith("multi\nline <object object")
    assert record["thing"].startswith("<object object")


def test_json_observer_writes_lines():
    out = io.StringIO()
    observer = json_observer(out)
    logger = Logger(namespace="exoproxy.test", observer=observer)

    logger.info("first {n}", n=1)
    logger.error("second {n}", n=2)

    lines = out.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["first 1", "second 2"]
    assert [json.loads(line)["level"] for line in lines] == ["info", "error"]


def test_parse_log_format():
    assert parse_log_format("text") == "text"
    assert parse_log_format("json") == "json"
    with pytest.raises(ConfigError) as raised:
        parse_log_format("xml")
    assert str(raised.value) == (
        "--log-format: invalid value 'xml'; use one of text, json"
    )


def test_log_format_option_and_environment():
    from_option = Options(environ={})
    from_option.parseOptions(["--simulate", "--log-format", "json"])
    from_environment = Options(environ={"EXOPROXY_LOG_FORMAT": "json"})
    from_environment.parseOptions(["--simulate"])
    default = Options(environ={})
    default.parseOptions(["--simulate"])

    assert from_option.log_format == "json"
    assert from_environment.log_format == "json"
    assert default.log_format == "text"
    with pytest.raises(SystemExit) as raised:
        Options(environ={}).parseOptions(["--simulate", "--log-format", "yaml"])
    assert str(raised.value).startswith("exoproxy: --log-format: invalid value")


def test_observer_given_to_application():
    observer = json_observer(io.StringIO())
    application = Application("exoproxy")
    other_parent = MultiService()

    give_observer_to_twistd(application, observer)
    give_observer_to_twistd(other_parent, observer)

    assert application.getComponent(ILogObserver) is observer


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api/generate", "/api/generate"),
        (b"/api/generate?token=abc&stream", "/api/generate?token=[redacted]&stream"),
        (b"/status?", "/status?"),
        (
            b"/api/blobs/sha256:" + b"a" * 64,
            "/api/blobs/sha256:" + "a" * 64,
        ),
        (b"/v1/models/granite3.1-dense:8b", "/v1/models/granite3.1-dense:8b"),
        (
            b"/v1/models/DeepSeek-R1-Distill-Qwen-32B-GGUF",
            "/v1/models/DeepSeek-R1-Distill-Qwen-32B-GGUF",
        ),
        (b"/sk-proj-abc123/api/tags", "/[redacted]/api/tags"),
        (b"/api/EXO0123456789abcdef01234567/x", "/api/[redacted]/x"),
        (b"/key/" + b"f3a9" * 10, "/key/[redacted]"),
        (b"/t/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "/t/[redacted]"),
        (b"/a/Bearer%20abc", "/a/[redacted]"),
        (b"/x?sk-live-1234=1", "/x?[redacted]=[redacted]"),
    ],
)
def test_redact_target(target, expected):
    assert redact_target(target) == expected


def test_looks_like_token_leaves_words():
    for text in ("api", "generate", "llama3.2:1b", "hf.co", "bartowski", ""):
        assert not looks_like_token(text), text


def access_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("log_namespace") == "exoproxy.access"]


@pytest_twisted.inlineCallbacks
def test_access_log_fields(captured):
    service, base_url = yield start_daemon(simulated_arguments())
    try:
        response = yield treq.get(f"{base_url}/status?token=abc")
        yield treq.content(response)
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        yield treq.content(response)
        response = yield treq.get(f"{base_url}/nowhere")
        yield treq.content(response)
    finally:
        yield service.stopService()

    status, generate, missing = access_events(captured)[:3]
    assert status["method"] == "GET"
    assert status["path"] == "/status?token=[redacted]"
    assert status["status"] == 200
    assert status["bytes"] > 0
    assert status["client"] == "127.0.0.1"
    assert status["route"] == "/status"
    assert 0 <= status["duration"] < 5
    assert status["held"] is False
    assert status["unavailable"] is False
    assert status["completed"] is True

    assert generate["status"] == 503
    assert generate["unavailable"] is True
    assert generate["route"] == "/api/generate"
    assert "(unavailable)" in json_record(generate)["message"]

    assert missing["status"] == 404
    assert missing["route"] == "unmatched"


class _RawRequest(Protocol):
    def __init__(self, request: bytes, done) -> None:
        self.request = request
        self.done = done

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


@pytest_twisted.inlineCallbacks
def test_access_log_path_with_braces(captured):
    # The line is passed to twisted.logger as a format, so its braces must come
    # out as they came in, not as fields.
    service, base_url = yield start_daemon(simulated_arguments())
    try:
        done = Deferred()
        request = (
            b"GET /{client}/{0}/x}{ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        factory = ClientFactory.forProtocol(lambda: _RawRequest(request, done))
        reactor.connectTCP("127.0.0.1", int(base_url.rsplit(":", 1)[1]), factory)
        yield done
    finally:
        yield service.stopService()

    event = access_events(captured)[0]
    message = formatEvent(event)
    assert event["path"] == "/{client}/{0}/x}{"
    assert message.startswith('127.0.0.1 "GET /{client}/{0}/x}{ HTTP/1.1" 404 ')
    assert json_record(event)["message"] == message


class _SendAndHangUp(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % len(GENERATE) + GENERATE
        )
        reactor.callLater(0.3, self.transport.loseConnection)


@pytest_twisted.inlineCallbacks
def test_access_log_held_then_gone(captured):
    service, base_url = yield start_daemon(
        simulated_arguments(hold_timeout=600, simulate_boot_delay=2)
    )
    try:
        factory = ClientFactory.forProtocol(_SendAndHangUp)
        port = int(base_url.rsplit(":", 1)[1])
        reactor.connectTCP("127.0.0.1", port, factory)
        yield sleep(0.6)
    finally:
        yield service.stopService()

    [event] = [e for e in access_events(captured) if e["route"] == "/api/generate"]
    assert event["held"] is True
    assert event["completed"] is False
    assert event["status"] == "-"
    record = json_record(event)
    assert "held" in record["message"]
    assert "connection lost" in record["message"]


@pytest_twisted.inlineCallbacks
def test_secret_never_logged(captured):
    service, base_url = yield start_daemon(simulated_arguments(hold_timeout=600))
    try:
        response = yield treq.post(f"{base_url}/api/generate", data=GENERATE)
        assert response.code == 200
        yield treq.content(response)
        secret = service.config.api_secret
    finally:
        yield service.stopService()

    assert len(secret) > 20
    lines = [format_json_line(event) for event in captured]
    assert len(lines) > 20
    assert not [line for line in lines if secret in line]


def test_twistd_logger_hook(tmp_path):
    port = free_port()
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    twistd = str(Path(sys.executable).parent / "twistd")
    with open(tmp_path / "out.log", "wb") as out:
        process = subprocess.Popen(
            [
                twistd,
                "--nodaemon",
                "--pidfile=",
                "--logger",
                "exoproxy.logs.json_observer",
                "exoproxy",
                "--simulate",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--backend-port",
                str(free_port()),
            ],
            cwd=tmp_path,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
                break
            except OSError:
                assert process.poll() is None
                assert time.monotonic() < deadline, "the daemon never listened"
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)

    records = [
        json.loads(line) for line in (tmp_path / "out.log").read_text().splitlines()
    ]
    messages = [record["message"] for record in records]
    assert any(message.startswith("exoproxy listening on") for message in messages)
    assert "Server Shut Down." in messages
    assert [r for r in records if r["namespace"] == "exoproxy.access"]
