"""
Verify the `EXO2-HMAC-SHA256` request signature of the Exoscale API v2.

The signed message is the one that `exoscale_auth.ExoscaleV2Auth` builds, from the
package requests-exoscale-auth that the `exoscale` SDK installs. It joins with
newlines the line `"<METHOD> <path>"`, the body, the values of the signed query
parameters in the order of `signed-query-args`, the signed headers (always empty),
and the expiry timestamp. The Authorization header carries
`EXO2-HMAC-SHA256 credential=<key>[,signed-query-args=<a;b>],expires=<ts>,
signature=<base64 HMAC-SHA256>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Mapping
from urllib.parse import parse_qs

SCHEME = "EXO2-HMAC-SHA256"


class SignatureError(Exception):
    """
    A request whose signature is missing, malformed, unknown, wrong or expired.
    """


def _parse_authorization(authorization: str) -> dict[str, str]:
    scheme, _, parameters_text = authorization.partition(" ")
    if scheme != SCHEME:
        raise SignatureError(
            f"Unsupported authorization scheme {scheme!r}: expected {SCHEME}"
        )

    parameters = {}
    for part in parameters_text.split(","):
        # The base64 signature may end with "=", so only the first "=" separates.
        name, separator, value = part.strip().partition("=")
        if not separator:
            raise SignatureError(f"Malformed Authorization parameter {name!r}")
        parameters[name] = value

    for required in ("credential", "expires", "signature"):
        if not parameters.get(required):
            raise SignatureError(f"Authorization header is missing {required}")
    return parameters


def signed_message(
    method: str,
    path: str,
    query: str,
    body: bytes,
    signed_names: list[str],
    expires: str,
) -> bytes:
    """
    Build the message that `ExoscaleV2Auth` signs.

    Args:
        method: The HTTP method, upper case.
        path: The request path as sent, percent-encoded, without the query.
        query: The raw query string, without `?`.
        body: The raw request body.
        signed_names: The names in `signed-query-args`, in their order.
        expires: The `expires` value of the Authorization header.
    """
    # ExoscaleV2Auth parses the query with parse_qs, which drops blank values, and
    # skips a parameter that occurs more than once while still naming it.
    values = parse_qs(query)
    signed_values = "".join(
        values[name][0] for name in signed_names if len(values.get(name, [])) == 1
    )
    parts = [
        f"{method} {path}".encode(),
        body,
        signed_values.encode(),
        b"",
        expires.encode(),
    ]
    return b"\n".join(parts)


def verify_signature(
    credentials: Mapping[str, str],
    *,
    method: str,
    path: str,
    query: str,
    body: bytes,
    authorization: str | None,
    now: float,
) -> str:
    """
    Verify the Authorization header of a request.

    Args:
        credentials: The accepted API secrets by API key.
        method: The HTTP method, upper case.
        path: The request path as sent, without the query.
        query: The raw query string, without `?`.
        body: The raw request body.
        authorization: The Authorization header, or None if the request has none.
        now: The current POSIX time, to compare with `expires`.

    Returns:
        The API key of the request.

    Raises:
        SignatureError: The header is missing or malformed, the key is unknown, a
            query parameter is not signed, the signature is wrong, or it expired.
    """
    if not authorization:
        raise SignatureError("Missing Authorization header")
    parameters = _parse_authorization(authorization)

    api_key = parameters["credential"]
    secret = credentials.get(api_key)
    if secret is None:
        raise SignatureError("Unknown API key")

    signed_names = [n for n in parameters.get("signed-query-args", "").split(";") if n]
    unsigned = sorted(set(parse_qs(query)) - set(signed_names))
    if unsigned:
        raise SignatureError(f"Query parameters {unsigned} are not signed")

    expires = parameters["expires"]
    message = signed_message(method, path, query, body, signed_names, expires)
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    expected = base64.standard_b64encode(digest)
    if not hmac.compare_digest(expected, parameters["signature"].encode()):
        raise SignatureError("Invalid request signature")

    if not expires.isdigit():
        raise SignatureError(f"Invalid expires timestamp {expires!r}")
    if int(expires) < now:
        raise SignatureError("Request signature expired")
    return api_key
