"""
The official ollama-js client under Node.js, through a cold start on the simulated
cloud.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from tests.daemon import simulated_arguments, start_daemon

JS_FOLDER = Path(__file__).resolve().parent / "js"
MODEL = "granite3.1-dense:8b"


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """
    Return the command that runs the ollama-js script, installing ollama-js from
    the lock file first if needed.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node and npm are needed in CI for the ollama-js tests")
        pytest.skip("node and npm are not installed")
    if not (JS_FOLDER / "node_modules" / "ollama").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=JS_FOLDER,
            check=True,
            timeout=300,
        )
    return [node, str(JS_FOLDER / "ollama_client.mjs")]


@pytest_twisted.inlineCallbacks
def test_ollama_js_through_cold_start(node_client):
    service, base_url = yield start_daemon(simulated_arguments())
    try:
        output, errors, code = yield getProcessOutputAndValue(
            node_client[0], node_client[1:] + [base_url, MODEL], env=dict(os.environ)
        )
        assert code == 0, errors.decode()
        seen = json.loads(output)

        assert seen["cold"]["name"] == "ResponseError"
        assert seen["cold"]["status"] == 503
        assert "GPU instance is starting" in seen["cold"]["error"]
        assert seen["streamedParts"] > 1
        assert seen["chatContent"]
        assert MODEL in seen["models"]
    finally:
        yield service.stopService()
