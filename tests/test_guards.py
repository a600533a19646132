"""
The suite's own loopback guards, which keep every test off the real cloud.
"""

from __future__ import annotations

import exoscale.api.v2
import pytest

from exoproxy.tap import Options


def test_sdk_default_endpoint_rejected():
    # Constructing a client sends nothing; the guard rejects it before any call.
    with pytest.raises(AssertionError, match="configured the Exoscale SDK"):
        exoscale.api.v2.Client("EXOkey", "secret", zone="at-vie-2")


def test_sdk_public_url_rejected():
    with pytest.raises(AssertionError, match="configured the Exoscale SDK"):
        exoscale.api.v2.Client(
            "EXOkey", "secret", url="https://api-at-vie-2.exoscale.com/v2"
        )


def test_simulate_never_uses_public_url():
    options = Options(environ={})
    options.parseOptions(["--simulate"])
    assert options.config.api_url == ""
