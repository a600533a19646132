"""
Unit tests of the EXO2-HMAC-SHA256 verification, on requests signed by the SDK's own
`exoscale_auth.ExoscaleV2Auth`.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
import requests
from exoscale_auth import ExoscaleV2Auth

from exoproxy.simulator.signature import SignatureError, verify_signature

CREDENTIALS = {"EXOkey": "secret"}


def signed(
    method: str,
    url: str,
    *,
    json=None,
    params=None,
    key: str = "EXOkey",
    secret: str = "secret",
    expires: int | None = None,
) -> requests.PreparedRequest:
    prepared = requests.Request(method, url, json=json, params=params).prepare()
    auth = ExoscaleV2Auth(key, secret)
    if expires is None:
        auth(prepared)
    else:
        auth._sign_request(prepared, expires)
    return prepared


def verify(prepared: requests.PreparedRequest, **changes) -> str:
    url = urlsplit(prepared.url)
    arguments = {
        "method": prepared.method,
        "path": url.path,
        "query": url.query,
        "body": prepared.body or b"",
        "authorization": prepared.headers.get("Authorization"),
        "now": time.time(),
    }
    arguments.update(changes)
    return verify_signature(CREDENTIALS, **arguments)


def test_get_accepted():
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance")

    assert verify(prepared) == "EXOkey"


def test_post_with_body_accepted():
    prepared = signed("POST", "http://127.0.0.1:1/v2/instance", json={"a": 1})

    assert verify(prepared) == "EXOkey"


def test_signed_query_accepted():
    params = {"labels": "a=1,b=2", "ip-address": "127.0.0.2"}
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance", params=params)

    assert "signed-query-args=ip-address;labels" in prepared.headers["Authorization"]
    assert verify(prepared) == "EXOkey"


def test_repeated_query_parameter_accepted():
    # ExoscaleV2Auth names a repeated parameter but signs none of its values.
    params = [("family", "ubuntu"), ("family", "debian")]
    prepared = signed("GET", "http://127.0.0.1:1/v2/template", params=params)

    assert verify(prepared) == "EXOkey"


def test_wrong_secret_rejected():
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance", secret="wrong")

    with pytest.raises(SignatureError, match="Invalid request signature"):
        verify(prepared)


def test_unknown_key_rejected():
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance", key="EXOother")

    with pytest.raises(SignatureError, match="Unknown API key"):
        verify(prepared)


def test_tampered_body_rejected():
    prepared = signed("POST", "http://127.0.0.1:1/v2/instance", json={"a": 1})

    with pytest.raises(SignatureError, match="Invalid request signature"):
        verify(prepared, body=b'{"a": 2}')


def test_tampered_path_rejected():
    prepared = signed("PUT", "http://127.0.0.1:1/v2/instance/x:stop")

    with pytest.raises(SignatureError, match="Invalid request signature"):
        verify(prepared, path="/v2/instance/x:start")


def test_tampered_method_rejected():
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance/x")

    with pytest.raises(SignatureError, match="Invalid request signature"):
        verify(prepared, method="DELETE")


def test_unsigned_query_rejected():
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance")

    with pytest.raises(SignatureError, match="not signed"):
        verify(prepared, query="labels=a%3D1")


def test_expired_rejected():
    expired = int(time.time()) - 5
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance", expires=expired)

    with pytest.raises(SignatureError, match="expired"):
        verify(prepared)


def test_missing_header_rejected():
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance")

    with pytest.raises(SignatureError, match="Missing Authorization"):
        verify(prepared, authorization=None)


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer token",
        "EXO2-HMAC-SHA256 credential=EXOkey",
        "EXO2-HMAC-SHA256 credential=EXOkey,expires=1,signature",
    ],
)
def test_malformed_header_rejected(authorization):
    prepared = signed("GET", "http://127.0.0.1:1/v2/instance")

    with pytest.raises(SignatureError):
        verify(prepared, authorization=authorization)
