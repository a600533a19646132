"""
The production code path, with credentials and `--exoscale-api-url`, against a
simulator that the test runs: the startup check and a cold start through twistd.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from exoproxy.simulator.service import SimulatorService
from exoproxy.simulator.timers import SimulatorTimings
from tests.daemon import free_port
from tests.test_twistd import REPOSITORY, twistd_command

API_KEY = "EXO" + "0" * 24
API_SECRET = secrets.token_urlsafe(32)


@pytest.fixture
def simulator():
    service = SimulatorService(
        reactor,
        api_key=API_KEY,
        api_secret=API_SECRET,
        timings=SimulatorTimings(
            operation_delay=0.05, start_delay=0.1, boot_delay=0.2, pull_delay=0.1
        ),
    )
    service.startService()
    pytest_twisted.blockon(service.when_listening())
    yield service
    pytest_twisted.blockon(service.stopService())


def real_mode_arguments(api_url: str, *extra: str) -> list[str]:
    return [
        "--nodaemon",
        "--pidfile=",
        "exoproxy",
        "--api-key",
        API_KEY,
        "--exoscale-api-url",
        api_url,
        "--allow-cidr",
        "127.0.0.0/8",
        "--backend-port",
        str(free_port()),
        "--poll-interval",
        "0.1",
        *extra,
    ]


def run_twistd(arguments: list[str], secret: str = API_SECRET):
    environment = dict(
        os.environ, PYTHONPATH=str(REPOSITORY), EXOSCALE_API_SECRET=secret
    )
    command = twistd_command()
    return getProcessOutputAndValue(
        command[0], command[1:] + arguments, env=environment, path=str(REPOSITORY)
    )


@pytest_twisted.inlineCallbacks
def test_wrong_secret_stops_at_startup(simulator):
    output, errors, code = yield run_twistd(
        real_mode_arguments(simulator.api_url), secret="not-the-secret"
    )
    assert code != 0
    lines = errors.decode().strip().splitlines()
    assert len(lines) == 1
    assert "rejected the API key" in lines[0]
    assert "not-the-secret" not in (output + errors).decode()
    assert "Traceback" not in (output + errors).decode()


@pytest_twisted.inlineCallbacks
def test_type_missing_in_zone_stops_at_startup(simulator):
    output, errors, code = yield run_twistd(
        real_mode_arguments(simulator.api_url, "--instance-type", "gpu3.huge")
    )
    assert code != 0
    message = errors.decode().strip()
    assert message.startswith("exoproxy: --instance-type: zone at-vie-2 offers no")
    assert "gpu3.huge" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ("--instance-type", "a5000.huge"),
            "exoproxy: --instance-type: zone at-vie-2 offers no instance type "
            "gpua5000.huge (its gpua5000 sizes are large, medium, small); list them "
            "with `exo compute instance-type list`",
        ),
        (
            ("--zone", "ch-gva-2"),
            "exoproxy: --instance-type: zone ch-gva-2 offers no instance type "
            "gpua5000.small (it has no gpua5000 type); list them with "
            "`exo compute instance-type list`",
        ),
        (
            ("--template", "Linux Plan 9"),
            "exoproxy: --template: zone at-vie-2 has no public template named "
            "'Linux Plan 9'",
        ),
    ],
)
@pytest_twisted.inlineCallbacks
def test_simulated_catalog_checked_at_startup(extra, expected):
    arguments = ["--nodaemon", "--pidfile=", "exoproxy", "--simulate", *extra]
    arguments += ["--listen", f"tcp:{free_port()}:interface=127.0.0.1"]
    output, errors, code = yield run_twistd(arguments)

    assert code == 1
    assert errors.decode().strip().splitlines() == [expected]
    assert b"Traceback" not in output + errors


@inlineCallbacks
def wait_for(predicate, seconds: float):
    for _ in range(int(seconds / 0.05)):
        value = yield predicate()
        if value:
            return value
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("timed out")


@pytest_twisted.inlineCallbacks
def test_real_mode_cold_start(simulator, tmp_path):
    port = free_port()
    arguments = real_mode_arguments(
        simulator.api_url, "--listen", f"tcp:{port}:interface=127.0.0.1"
    )
    environment = dict(
        os.environ, PYTHONPATH=str(REPOSITORY), EXOSCALE_API_SECRET=API_SECRET
    )
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            twistd_command() + arguments + ["--idle-timeout", "600"],
            env=environment,
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:

        @inlineCallbacks
        def status():
            try:
                response = yield treq.get(f"{base_url}/status")
            except Exception:
                return None
            return json.loads((yield treq.content(response)))

        first = yield wait_for(status, 30)
        assert first["mode"] == "exoscale"
        assert first["simulated"] is False

        response = yield treq.post(
            f"{base_url}/api/generate",
            data=b'{"model": "granite3.1-dense:8b", "prompt": "hi", "stream": false}',
        )
        assert response.code == 503
        yield treq.content(response)

        @inlineCallbacks
        def ready():
            current = yield status()
            return current if current["provisioning_status"] == "ready" else None

        yield wait_for(ready, 30)
        created = [c for c in simulator.cloud.calls if c.operation == "create-instance"]
        assert len(created) == 1
        rules = [
            rule["network"]
            for group in simulator.cloud.security_groups.list()
            for rule in group["rules"]
        ]
        assert rules == ["127.0.0.0/8"]
    finally:
        process.send_signal(signal.SIGTERM)
        yield deferToThread(process.wait, 30)
    log = log_path.read_text()
    assert API_SECRET not in log
    assert "Traceback" not in log
