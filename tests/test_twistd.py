"""
`twistd -n exoproxy --simulate` as a subprocess, used through the official ollama
client, as a new user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import ollama
import pytest

from tests.daemon import free_port

REPOSITORY = Path(__file__).resolve().parent.parent
MODEL = "granite3.1-dense:8b"


def twistd_command() -> list[str]:
    twistd = shutil.which("twistd", path=os.path.dirname(sys.executable))
    return [twistd] if twistd else [sys.executable, "-m", "twisted"]


def read_status(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/status", timeout=5) as response:
        return json.load(response)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def daemon(tmp_path):
    port = free_port()
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    for name in ("EXOSCALE_API_KEY", "EXOSCALE_API_SECRET", "EXOSCALE_API_URL"):
        environment.pop(name, None)
    log_path = tmp_path / "twistd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            twistd_command()
            + [
                "--nodaemon",
                "--pidfile=",
                "exoproxy",
                "--simulate",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--backend-port",
                str(free_port()),
                "--simulate-boot-delay",
                "0.3",
                "--poll-interval",
                "0.1",
                "--idle-timeout",
                "2",
                "--idle-check-interval",
                "0.1",
            ],
            cwd=tmp_path,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"

    def listening():
        try:
            return read_status(base_url)
        except OSError:
            assert process.poll() is None, log_path.read_text()
            return None

    wait_until(listening, 30, "the daemon to listen")
    yield base_url, process, log_path
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_twistd_simulated_cold_start(daemon):
    base_url, process, log_path = daemon
    client = ollama.Client(host=base_url)

    status = read_status(base_url)
    assert status["simulated"] is True
    assert status["provisioning_status"] == "idle"

    with pytest.raises(ollama.ResponseError) as raised:
        client.generate(MODEL, "hi")
    assert raised.value.status_code == 503

    wait_until(
        lambda: read_status(base_url)["provisioning_status"] == "ready",
        30,
        "the instance to be ready",
    )
    parts = list(client.generate(MODEL, "hi", stream=True))
    assert parts[-1].done
    chat = list(client.chat(MODEL, [{"role": "user", "content": "hi"}], stream=True))
    assert chat[-1].done

    wait_until(
        lambda: read_status(base_url)["instance_status"] == "stopped",
        30,
        "the idle stop",
    )

    process.send_signal(signal.SIGTERM)
    # twistd shuts down cleanly, then ends itself with the signal it got.
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    log = log_path.read_text()
    assert "Server Shut Down." in log
    assert "SIMULATED CLOUD" in log
    assert "Traceback" not in log


def test_twistd_bad_option_one_line(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    finished = subprocess.run(
        twistd_command() + ["--nodaemon", "exoproxy", "--zone", "nowhere"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode != 0
    lines = finished.stderr.strip().splitlines()
    assert lines == [
        "exoproxy: --zone: unknown zone 'nowhere'; use one of at-vie-1, "
        "at-vie-2, bg-sof-1, ch-dk-2, ch-gva-2, de-fra-1, de-muc-1, hr-zag-1"
    ]
    assert "Traceback" not in finished.stdout
