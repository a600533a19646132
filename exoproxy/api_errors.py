"""
Failed Exoscale API calls, sorted into the ones that a retry may fix and the ones
that it never will, with messages that are safe to log and to show in `/status`.

The SDK (exoscale 0.16) raises `ExoscaleAPIAuthException` for 403,
`ExoscaleAPIClientException` for the other 4xx and `ExoscaleAPIServerException`
for 5xx, each with the requests `Response` as `.response`. requests raises its own
exceptions when no response arrives. The SDK's messages include the response body,
and requests' messages include the URL. Neither includes the API secret or the
signature, but every message is redacted before it leaves this module, because the
`Response` object also carries the signed request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from exoscale.api.exceptions import (
    ExoscaleAPIAuthException,
    ExoscaleAPIClientException,
    ExoscaleAPIServerException,
)
from requests import exceptions as requests_errors
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure
from urllib3.exceptions import MaxRetryError, NewConnectionError

from exoproxy.retry import parse_retry_after

# The Authorization header of the SDK's requests, and its signature parameter.
_SIGNATURE_HEADER = re.compile(r"EXO2-HMAC-SHA256\s+[^\s'\"]+")
_SIGNATURE_PARAMETER = re.compile(r"signature=[A-Za-z0-9+/=_-]+")

_MAX_DETAIL_LENGTH = 300


class ApiCallFailed(Exception):
    """
    An Exoscale API call that failed, after any retries.

    Attributes:
        operation: the SDK method, such as "create_instance".
        status: the HTTP status of the response, or None when none arrived.
        transient: whether a later attempt may succeed (429, 5xx, timeouts and
            connection errors).
        maybe_applied: whether the API may have carried out the request although
            the call failed, because the request was sent and no clear response
            came back.
        retry_after: the seconds that the server asked to wait, if it did.
    """

    def __init__(
        self,
        operation: str,
        detail: str,
        *,
        status: int | None = None,
        transient: bool = False,
        maybe_applied: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{api_name(operation)} failed: {detail}")
        self.operation = operation
        self.detail = detail
        self.status = status
        self.transient = transient
        self.maybe_applied = maybe_applied
        self.retry_after = retry_after


def api_name(operation: str) -> str:
    """
    Return the API's name of an SDK method: "create_instance" is
    "create-instance".
    """
    return operation.replace("_", "-")


def redact(text: str, secrets: Iterable[str]) -> str:
    """
    Replace each secret, and any Exoscale request signature, in C{text} with
    "[redacted]".
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _SIGNATURE_HEADER.sub("EXO2-HMAC-SHA256 [redacted]", text)
    return _SIGNATURE_PARAMETER.sub("signature=[redacted]", text)


def describe_failure(
    operation: str, failure: Failure, *, secrets: Iterable[str], now: float
) -> ApiCallFailed:
    """
    Return the L{ApiCallFailed} for one failed attempt of an SDK call.

    An exception that is neither the SDK's nor requests' nor a timeout is a bug
    in exoproxy or the SDK, so it is not transient.
    """
    error = failure.value
    if isinstance(error, ApiCallFailed):
        return error

    if isinstance(error, ExoscaleAPIAuthException):
        status, message = _response_detail(error.response)
        return ApiCallFailed(
            operation,
            redact(
                f"HTTP {status or 403}: {message}; check the API key, its secret "
                "and that its role may manage compute instances",
                secrets,
            ),
            status=status or 403,
        )

    if isinstance(error, (ExoscaleAPIClientException, ExoscaleAPIServerException)):
        return _from_api_response(operation, error, secrets=secrets, now=now)

    if isinstance(error, requests_errors.ConnectTimeout):
        return ApiCallFailed(
            operation,
            "timed out connecting to the API",
            transient=True,
        )
    if isinstance(error, requests_errors.ConnectionError):
        reason = error.args[0] if error.args else error
        refused = isinstance(reason, MaxRetryError) and isinstance(
            reason.reason, NewConnectionError
        )
        cause = reason.reason if isinstance(reason, MaxRetryError) else reason
        return ApiCallFailed(
            operation,
            redact(f"connection failed: {_short(cause)}", secrets),
            transient=True,
            maybe_applied=not refused,
        )
    if isinstance(error, (requests_errors.Timeout, DeferredTimeout)):
        return ApiCallFailed(
            operation,
            "timed out waiting for the answer (--api-timeout)",
            transient=True,
            maybe_applied=True,
        )
    if isinstance(error, requests_errors.JSONDecodeError):
        return ApiCallFailed(
            operation,
            "the API answered with a body that is not valid JSON",
            transient=True,
            maybe_applied=True,
        )
    if isinstance(error, requests_errors.RequestException):
        return ApiCallFailed(
            operation,
            redact(f"request failed: {_short(error)}", secrets),
            transient=True,
            maybe_applied=True,
        )
    return ApiCallFailed(
        operation,
        redact(f"unexpected {type(error).__name__}: {_short(error)}", secrets),
    )


def _from_api_response(
    operation: str, error: Exception, *, secrets: Iterable[str], now: float
) -> ApiCallFailed:
    response = getattr(error, "response", None)
    status, message = _response_detail(response)
    if status is None:
        # Raised by the SDK without a response, such as Client.wait's errors.
        return ApiCallFailed(operation, redact(_short(error), secrets))

    detail = redact(f"HTTP {status}: {message}", secrets)
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
        return ApiCallFailed(
            operation,
            detail,
            status=status,
            transient=True,
            retry_after=retry_after,
        )
    if status == 408 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
        return ApiCallFailed(
            operation,
            detail,
            status=status,
            transient=True,
            maybe_applied=True,
            retry_after=retry_after,
        )
    return ApiCallFailed(operation, detail, status=status)


def _response_detail(response: Any) -> tuple[int | None, str]:
    """
    Return the status and the API's message of an error response.
    """
    if response is None:
        return None, "no response"
    status = getattr(response, "status_code", None)
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return status, _short(body["message"])
    text = (getattr(response, "text", "") or "").strip()
    return status, _short(text) if text else "no message"


def _short(value: object) -> str:
    text = " ".join(str(value).split())
    if len(text) > _MAX_DETAIL_LENGTH:
        return text[: _MAX_DETAIL_LENGTH - 3] + "..."
    return text
