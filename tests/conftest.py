"""
Guards for the whole test suite: nothing may leave the loopback network.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import exoscale.api.v2
import pytest


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _checked_connect(original):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if not _is_loopback(host):
                raise AssertionError(f"a test tried to connect to {address!r}")
        return original(self, address)

    return connect


@pytest.fixture(autouse=True, scope="session")
def loopback_only():
    """
    Fail any test that connects outside 127.0.0.0/8 and ::1, or that configures the
    Exoscale SDK with an endpoint that is not on loopback, its public default
    included.
    """
    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", _checked_connect(socket.socket.connect))
    patch.setattr(
        socket.socket, "connect_ex", _checked_connect(socket.socket.connect_ex)
    )

    original_init = exoscale.api.v2.Client.__init__

    def checked_init(self, key, secret, *args, url=None, **kwargs):
        host = urlsplit(url).hostname if url else None
        if host is None or not _is_loopback(host):
            raise AssertionError(f"a test configured the Exoscale SDK with {url!r}")
        original_init(self, key, secret, *args, url=url, **kwargs)

    patch.setattr(exoscale.api.v2.Client, "__init__", checked_init)
    yield
    patch.undo()
