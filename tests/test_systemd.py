"""
exoproxy as a systemd service, without systemd as PID 1: the sd_notify messages that
twistd sends to a datagram socket of the test, the unit files as systemd-analyze
reads them, socket activation through systemd-socket-activate, and the credentials
that LoadCredential passes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from exoproxy.notify import SystemdNotifier, status_line
from exoproxy.tap import Options
from tests.daemon import free_port

REPOSITORY = Path(__file__).resolve().parent.parent
UNITS = REPOSITORY / "contrib" / "systemd"
MODEL = "granite3.1-dense:8b"
GENERATE = json.dumps({"model": MODEL, "prompt": "hi"}).encode()


def require_binary(name: str) -> str:
    """
    Return the path of a binary from Debian's systemd package, or skip the test
    without it; in CI (CI=true) a missing binary fails the test instead.
    """
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian package systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def twistd_path() -> str:
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists(), f"twistd is missing next to {sys.executable}"
    return str(twistd)


def daemon_environment(**extra: str) -> dict[str, str]:
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY), **extra)
    for name in (
        "EXOSCALE_API_KEY",
        "EXOSCALE_API_SECRET",
        "EXOSCALE_API_URL",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "CREDENTIALS_DIRECTORY",
    ):
        environment.pop(name, None)
    return environment


def simulated_options(port_description: str, **overrides: str) -> list[str]:
    settings = {
        "listen": port_description,
        "backend-port": str(free_port()),
        "simulate-boot-delay": "0.3",
        "poll-interval": "0.1",
        "idle-timeout": "1",
        "idle-check-interval": "0.1",
    }
    settings.update(overrides)
    arguments = ["exoproxy", "--simulate"]
    for name, value in settings.items():
        arguments += [f"--{name}", value]
    return arguments


class NotifySocket:
    """
    A datagram socket that plays systemd's side of sd_notify.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound = "\0" + address[1:] if address.startswith("@") else address
        self.socket.bind(bound)
        self.messages: list[dict[str, str]] = []

    def receive_until(self, predicate, timeout: float, what: str) -> dict[str, str]:
        """
        Receive messages until one matches C{predicate}, and return it.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout} s: {self.messages}")
            self.socket.settimeout(remaining)
            try:
                datagram = self.socket.recv(4096)
            except TimeoutError:
                continue
            fields = dict(
                line.split("=", 1) for line in datagram.decode().splitlines() if line
            )
            self.messages.append(fields)
            if predicate(fields):
                return fields

    def statuses(self) -> list[str]:
        return [fields["STATUS"] for fields in self.messages if "STATUS" in fields]

    def close(self) -> None:
        self.socket.close()
        if not self.address.startswith("@") and os.path.exists(self.address):
            os.unlink(self.address)


@pytest.fixture
def notify_socket():
    # An abstract-namespace name, as systemd passes for user services and as
    # containers do; it also keeps clear of the 108-byte limit of socket paths.
    listener = NotifySocket(f"@exoproxy-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def http_post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def stop_process(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def test_notify_ready_phases_and_stopping(notify_socket, tmp_path):
    port = free_port()
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [twistd_path(), "--nodaemon", "--pidfile="]
            + simulated_options(f"tcp:{port}:interface=127.0.0.1"),
            cwd=tmp_path,
            env=daemon_environment(NOTIFY_SOCKET=notify_socket.address),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = notify_socket.receive_until(
            lambda fields: fields.get("READY") == "1", 30, "READY=1"
        )
        assert ready["STATUS"].startswith("idle")
        # READY=1 comes once the port is bound, so the daemon responds now.
        assert http_get(f"http://127.0.0.1:{port}/")[0] == 200

        assert http_post(f"http://127.0.0.1:{port}/api/generate", GENERATE) == 503
        notify_socket.receive_until(
            lambda fields: fields.get("STATUS") == "ready", 30, "STATUS=ready"
        )
        notify_socket.receive_until(
            lambda fields: fields.get("STATUS") == "idle: instance stopped",
            30,
            "the idle stop",
        )

        stop_process(process)
        notify_socket.receive_until(
            lambda fields: fields.get("STOPPING") == "1", 10, "STOPPING=1"
        )
    finally:
        stop_process(process)

    statuses = notify_socket.statuses()
    cold_start = statuses[statuses.index("provisioning: finding instance") :]
    ready_at = cold_start.index("ready")
    assert cold_start[:4] == [
        "provisioning: finding instance",
        "provisioning: creating instance",
        "provisioning: waiting for boot",
        "provisioning: waiting for ollama",
    ]
    # The simulated Ollama may also report that it is pulling the model.
    assert set(cold_start[4:ready_at]) <= {"provisioning: pulling model"}
    assert "stopping" in cold_start
    assert cold_start.index("stopping") < cold_start.index("idle: instance stopped")
    assert "Traceback" not in log_path.read_text()


def test_notifier_path_socket(tmp_path):
    listener = NotifySocket(str(tmp_path / "notify"))
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": listener.address})
    try:
        notifier.ready("idle: waiting\nfor a request")
        notifier.stopping()
        first = listener.receive_until(lambda fields: True, 5, "READY=1")
        second = listener.receive_until(lambda fields: True, 5, "STOPPING=1")
    finally:
        notifier.close()
        listener.close()

    assert first == {"READY": "1", "STATUS": "idle: waiting for a request"}
    assert second["STOPPING"] == "1"


def test_notifier_without_socket_is_noop():
    notifier = SystemdNotifier.from_environment({})

    notifier.ready("idle")
    notifier.status("ready")
    notifier.stopping()
    notifier.close()

    assert not notifier.enabled


def test_notifier_failure_logged_once(tmp_path):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens"))
    try:
        for _ in range(5):
            notifier.status("ready")
    finally:
        globalLogPublisher.removeObserver(events.append)
        notifier.close()

    warnings = [
        formatEvent(event)
        for event in events
        if event.get("log_namespace") == "exoproxy.notify"
    ]
    assert len(warnings) == 1
    assert "nobody-listens" in warnings[0]


def test_notifier_unsupported_address():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    notifier = SystemdNotifier("vsock:2:1234")
    try:
        notifier.status("ready")
        notifier.status("ready")
    finally:
        globalLogPublisher.removeObserver(events.append)

    warnings = [e for e in events if e.get("log_namespace") == "exoproxy.notify"]
    assert len(warnings) == 1
    assert "unsupported socket address" in formatEvent(warnings[0])


@pytest.mark.parametrize(
    ("state", "phase", "error", "expected"),
    [
        ("provisioning", "waiting for boot", None, "provisioning: waiting for boot"),
        ("ready", "ready", None, "ready"),
        ("stopping", "stopping", None, "stopping"),
        ("idle", "stopped", None, "idle: instance stopped"),
        ("error", "error", "quota exceeded", "error: quota exceeded"),
        ("error", "error", None, "error"),
    ],
)
def test_status_line(state, phase, error, expected):
    assert status_line(state, phase, error) == expected


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """
    Return the (section, key, value) settings of a unit file, repeated keys
    included.
    """
    settings = []
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_settings(path) if (s, k) == (section, key)]


def test_service_unit_settings():
    service = UNITS / "exoproxy.service"

    assert values(service, "Service", "Type") == ["notify"]
    [command] = values(service, "Service", "ExecStart")
    assert " --nodaemon --pidfile= exoproxy " in command
    assert "--listen systemd:domain=INET:name=exoproxy" in command
    assert values(service, "Service", "DynamicUser") == ["yes"]
    assert values(service, "Service", "StateDirectory") == ["exoproxy"]
    assert values(service, "Service", "Restart") == ["on-failure"]
    credentials = [
        value.split(":")[0] for value in values(service, "Service", "LoadCredential")
    ]
    assert sorted(credentials) == ["exoscale-api-key", "exoscale-api-secret"]

    for key, expected in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ):
        assert values(service, "Service", key) == [expected], key
    assert values(service, "Service", "RestrictAddressFamilies") == [
        "AF_INET AF_INET6 AF_UNIX"
    ]
    assert "@system-service" in values(service, "Service", "SystemCallFilter")


def test_socket_unit_names_descriptor():
    socket_unit = UNITS / "exoproxy.socket"

    assert values(socket_unit, "Socket", "FileDescriptorName") == ["exoproxy"]
    [address] = values(socket_unit, "Socket", "ListenStream")
    assert address.endswith(":11434")
    # A dotted IPv4 address, because ExecStart adopts the socket as domain=INET.
    assert address.split(":")[0].count(".") == 3


def verified_copy(tmp_path: Path) -> Path:
    """
    Copy the units with ExecStart pointing at this environment's twistd, since
    systemd-analyze verify checks that the binary exists.
    """
    for unit in ("exoproxy.service", "exoproxy.socket"):
        text = (UNITS / unit).read_text()
        text = text.replace("/opt/exoproxy/bin/twistd", twistd_path())
        (tmp_path / unit).write_text(text)
    return tmp_path


def test_units_verify(tmp_path):
    analyze = require_binary("systemd-analyze")
    units = verified_copy(tmp_path)

    finished = subprocess.run(
        [
            analyze,
            "verify",
            str(units / "exoproxy.socket"),
            str(units / "exoproxy.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    # verify reports problems of other units that the host has; none may be ours.
    assert "exoproxy" not in finished.stderr, finished.stderr


def test_units_security_exposure(tmp_path):
    analyze = require_binary("systemd-analyze")
    supported = subprocess.run(
        [analyze, "security", "--help"], capture_output=True, text=True, timeout=30
    )
    if "--offline" not in supported.stdout:
        pytest.skip("systemd-analyze security has no --offline (systemd < 250)")
    units = verified_copy(tmp_path)

    finished = subprocess.run(
        [analyze, "security", "--offline=yes", str(units / "exoproxy.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    # systemd rates a service from 0 to 10, where 10 is no sandboxing at all and
    # up to 2 is "OK". The overall line is parsed because --threshold compares
    # against another scale in systemd 252 (1.1 passes only with --threshold=100).
    overall = re.search(r"Overall exposure level for \S+: ([0-9.]+)", finished.stdout)
    assert overall is not None, finished.stdout
    assert float(overall.group(1)) <= 2.0, finished.stdout


def wait_for_activation_socket(stderr_path: Path, process: subprocess.Popen) -> None:
    """
    Wait until systemd-socket-activate has bound its socket; connecting earlier
    is refused.
    """
    deadline = time.monotonic() + 30
    while "Listening on" not in stderr_path.read_text():
        assert process.poll() is None, stderr_path.read_text()
        assert time.monotonic() < deadline, "systemd-socket-activate never listened"
        time.sleep(0.05)


def test_socket_activation_json_logs_metrics(notify_socket, tmp_path):
    activate = require_binary("systemd-socket-activate")
    port = free_port()
    stdout_path = tmp_path / "stdout.log"
    stderr_path = tmp_path / "stderr.log"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [
                activate,
                "--listen",
                f"127.0.0.1:{port}",
                # Twisted 26.10 adopts inherited sockets only when they are named.
                "--fdname=exoproxy",
                "--setenv=PYTHONPATH",
                "--setenv=NOTIFY_SOCKET",
                "--setenv=EXOPROXY_LOG_FORMAT=json",
                twistd_path(),
                "--nodaemon",
                "--pidfile=",
            ]
            + simulated_options(
                "systemd:domain=INET:name=exoproxy", **{"idle-timeout": "60"}
            ),
            cwd=tmp_path,
            env=daemon_environment(NOTIFY_SOCKET=notify_socket.address),
            stdout=stdout,
            stderr=stderr,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_activation_socket(stderr_path, process)
        # systemd-socket-activate starts twistd on the first connection; that
        # connection waits in the socket's backlog until the daemon accepts it.
        assert http_get(f"{base_url}/", timeout=30) == (200, b"Ollama is running")
        notify_socket.receive_until(
            lambda fields: fields.get("READY") == "1", 10, "READY=1"
        )

        assert http_post(f"{base_url}/api/generate?token=abc", GENERATE) == 503
        notify_socket.receive_until(
            lambda fields: fields.get("STATUS") == "ready", 30, "STATUS=ready"
        )
        code, metrics = http_get(f"{base_url}/metrics")
        assert code == 200
    finally:
        stop_process(process)

    text = metrics.decode()
    for series in (
        'exoproxy_http_requests_total{route="/",status="200"} 1.0',
        'exoproxy_http_requests_total{route="/api/generate",status="503"} 1.0',
        "exoproxy_http_requests_in_flight ",
        "exoproxy_held_requests 0.0",
        "exoproxy_time_to_ready_seconds_count 1.0",
        'exoproxy_instance_state{exoproxy_instance_state="ready"} 1.0',
        "exoproxy_instance_uptime_seconds_total ",
        (
            'exoproxy_exoscale_api_calls_total{operation="create_instance",'
            'result="success"} 1.0'
        ),
        "exoproxy_upstream_bytes_total ",
    ):
        assert series in text, series

    records = [json.loads(line) for line in stdout_path.read_text().splitlines()]
    assert records
    for record in records:
        assert list(record)[:4] == ["time", "level", "namespace", "message"]
    access = [r for r in records if r["namespace"] == "exoproxy.access"]
    generate = [r for r in access if r["route"] == "/api/generate"]
    assert generate[0]["path"] == "/api/generate?token=[redacted]"
    assert generate[0]["status"] == 503
    assert generate[0]["unavailable"] is True
    assert generate[0]["client"] == "127.0.0.1"
    assert "Traceback" not in stdout_path.read_text()


def test_socket_activation_unnamed_descriptor(tmp_path):
    activate = require_binary("systemd-socket-activate")
    port = free_port()
    stdout_path = tmp_path / "stdout.log"
    stderr_path = tmp_path / "stderr.log"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [
                activate,
                "--listen",
                f"127.0.0.1:{port}",
                "--setenv=PYTHONPATH",
                twistd_path(),
                "--nodaemon",
                "--pidfile=",
            ]
            + simulated_options("systemd:domain=INET:index=0"),
            cwd=tmp_path,
            env=daemon_environment(),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        wait_for_activation_socket(stderr_path, process)
        # The first connection makes systemd-socket-activate start twistd, which
        # cannot adopt the socket and stops.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            client.settimeout(30)
            try:
                answer = client.recv(100)
            except (ConnectionResetError, TimeoutError):
                answer = b""
        assert process.wait(timeout=30) is not None
    finally:
        stop_process(process)

    assert not answer.startswith(b"HTTP/1.1 200")
    assert "no such socket was inherited from systemd" in stdout_path.read_text()


def parse_options(arguments: list[str], environ: dict[str, str]) -> Options:
    options = Options(environ=environ)
    options.parseOptions(
        arguments
        + [
            "--allow-cidr",
            "203.0.113.7/32",
            "--exoscale-api-url",
            "http://127.0.0.1:9/v2",
        ]
    )
    return options


def test_credentials_directory(tmp_path):
    (tmp_path / "exoscale-api-key").write_text("EXOkey\n")
    (tmp_path / "exoscale-api-secret").write_text("secret-from-credential\n")

    config = parse_options([], {"CREDENTIALS_DIRECTORY": str(tmp_path)}).config

    assert config.api_key == "EXOkey"
    assert config.api_secret == "secret-from-credential"


def test_credentials_environment_wins(tmp_path):
    (tmp_path / "exoscale-api-key").write_text("EXOkey\n")
    (tmp_path / "exoscale-api-secret").write_text("secret-from-credential\n")
    secret_file = tmp_path / "secret-file"
    secret_file.write_text("secret-from-file\n")
    environ = {
        "CREDENTIALS_DIRECTORY": str(tmp_path),
        "EXOSCALE_API_KEY": "EXOenv",
        "EXOSCALE_API_SECRET": "secret-from-environment",
    }

    from_environment = parse_options([], environ).config
    from_file = parse_options(["--api-secret-file", str(secret_file)], environ).config

    assert from_environment.api_key == "EXOenv"
    assert from_environment.api_secret == "secret-from-environment"
    assert from_file.api_secret == "secret-from-file"


def test_credentials_empty_rejected(tmp_path):
    (tmp_path / "exoscale-api-key").write_text("EXOkey\n")
    (tmp_path / "exoscale-api-secret").write_text("\n")

    with pytest.raises(SystemExit) as raised:
        parse_options([], {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    message = str(raised.value)
    assert message.startswith("exoproxy: credential exoscale-api-secret: ")
    assert message.endswith("is empty")


def test_credentials_missing_named(tmp_path):
    with pytest.raises(SystemExit) as raised:
        parse_options(["--api-key", "EXOkey"], {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert "systemd credential exoscale-api-secret" in str(raised.value)
