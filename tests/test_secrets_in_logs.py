"""
Secrets never reach the log or `/status`: the Exoscale API secret, the SDK's
`EXO2-HMAC-SHA256` signature and the clients' bearer tokens, through cold starts
with injected API faults, rejected credentials and requests that carry tokens.
The log is every event of the process during the test, and the log of a twistd
subprocess.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess

import pytest_twisted
import treq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.daemon import free_port
from tests.fault_daemon import (  # noqa: F401 (fixtures)
    GENERATE,
    captured_log,
    daemon_arguments,
    daemons,
    sleep,
    wait_until,
    zone,
)
from tests.test_twistd import REPOSITORY, twistd_command

CLIENT_TOKEN = "client-" + secrets.token_urlsafe(24)
WRONG_SECRET = "wrong-" + secrets.token_urlsafe(24)
SIGNATURE_MARKS = ("EXO2-HMAC-SHA256", "signature=")


def leaks(text: str, *secret_values: str) -> list[str]:
    """
    Return each secret or signature mark that occurs in C{text}.
    """
    found = [value for value in secret_values if value in text]
    found += [mark for mark in SIGNATURE_MARKS if mark in text]
    return found


def arm_faults(faults) -> None:
    faults.fail_calls("list-instances", "status", status=500)
    faults.fail_calls("list-templates", "drop")
    faults.fail_calls("list-instance-types", "malformed")
    faults.fail_calls("create-instance", "status", status=503, after=True)
    faults.fail_calls("get-instance", "status", status=429, retry_after=0)
    faults.fail_operations("create-security-group", reason=None)


@inlineCallbacks
def authorized(method: str, url: str, body: bytes | None = None):
    response = yield treq.request(
        method,
        url,
        data=body,
        headers={"Authorization": f"Bearer {CLIENT_TOKEN}"},
    )
    content = yield treq.content(response)
    return response.code, content


@pytest_twisted.inlineCallbacks
def test_in_process_log_has_no_secrets(zone, daemons, captured_log):
    arm_faults(zone.cloud.faults)
    environ = {"EXOPROXY_API_KEYS": CLIENT_TOKEN}
    _, base_url = yield daemons.start(environ=environ, run_retry_delay="0.1")

    statuses = []
    for _ in range(3):
        yield authorized("POST", f"{base_url}/api/generate", GENERATE)
        code, body = yield authorized("GET", f"{base_url}/status")
        assert code == 200
        statuses.append(body.decode())
        yield sleep(0.3)
    yield wait_until(
        lambda: status_of_authorized(base_url), 20, "the instance to be ready"
    )
    yield authorized("GET", f"{base_url}/api/tags?key={CLIENT_TOKEN}")
    yield authorized("POST", f"{base_url}/api/generate", GENERATE)
    code, _ = yield authorized("POST", f"{base_url}/api/chat", b"{not json")
    assert code == 400
    # A wrong token is rejected without being logged either.
    response = yield treq.get(
        f"{base_url}/api/ps", headers={"Authorization": f"Bearer {WRONG_SECRET}"}
    )
    assert response.code == 401
    yield treq.content(response)
    _, body = yield authorized("GET", f"{base_url}/status")
    statuses.append(body.decode())

    # A daemon with a wrong API secret gets 403s, whose messages are logged.
    _, rejected_url = yield daemons.start(secret=WRONG_SECRET, environ=environ)
    yield authorized("POST", f"{rejected_url}/api/generate", GENERATE)

    @inlineCallbacks
    def failed():
        code, body = yield authorized("GET", f"{rejected_url}/status")
        status = json.loads(body)
        statuses.append(body.decode())
        return status["provisioning_status"] == "error"

    yield wait_until(failed, 10, "the 403 to be reported")
    assert "HTTP 403" in statuses[-1]
    yield daemons.stop_all()

    log = captured_log.text()
    assert "retrying" in log
    assert "HTTP 403" in log
    assert leaks(log, zone.secret, WRONG_SECRET, CLIENT_TOKEN) == []
    for status in statuses:
        assert leaks(status, zone.secret, WRONG_SECRET, CLIENT_TOKEN) == []


@inlineCallbacks
def status_of_authorized(base_url: str):
    code, body = yield authorized("GET", f"{base_url}/status")
    return code == 200 and json.loads(body)["provisioning_status"] == "ready"


@pytest_twisted.inlineCallbacks
def test_twistd_log_has_no_secrets(zone, tmp_path):
    arm_faults(zone.cloud.faults)
    port = free_port()
    arguments, environ = daemon_arguments(
        zone, tmp_path / "state", listen=f"tcp:{port}:interface=127.0.0.1"
    )
    environment = dict(
        os.environ,
        PYTHONPATH=str(REPOSITORY),
        EXOPROXY_API_KEYS=CLIENT_TOKEN,
        **environ,
    )
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            twistd_command() + ["--nodaemon", "--pidfile=", "exoproxy", *arguments],
            cwd=tmp_path,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:

        @inlineCallbacks
        def ready():
            try:
                answer = yield status_of_authorized(base_url)
            except Exception:
                return False
            if not answer:
                yield authorized("POST", f"{base_url}/api/generate", GENERATE)
            return answer

        yield wait_until(ready, 40, "the twistd daemon to be ready")
        yield authorized("GET", f"{base_url}/api/tags?token={CLIENT_TOKEN}")
        yield authorized("POST", f"{base_url}/api/generate", GENERATE)
    finally:
        process.send_signal(signal.SIGTERM)
        yield deferToThread(process.wait, 30)

    log = log_path.read_text()
    assert "retrying" in log
    assert "Traceback" not in log
    assert leaks(log, zone.secret, CLIENT_TOKEN) == []
