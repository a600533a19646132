"""
The client side of the path from exoproxy to its instance: the TLS policy that
trusts only the instance's pinned certificate, and the agent that sends the
instance's bearer secret over the connections that this policy verified.
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs
import service_identity  # optionsForClientTLS checks names only with it
from OpenSSL import SSL
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from exoproxy.backend_tls import SERVICE_NAME, BackendMaterial

log = Logger()


@attrs.define
class _Rejection:
    address: str
    instance_id: str | None
    expected_certificate: str
    reason: str
    at: float


def _netloc(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@implementer(IPolicyForHTTPS)
class BackendTLSPolicy:
    """
    Trust only the pinned certificate for the managed instance's address, and the
    system's certificate authorities for every other HTTPS URL, such as a fixed
    `--backend-url`.

    A pinned backend that presents another certificate fails the handshake, before
    the agent sends any request byte. `BackendAgent` reports each such rejection
    here: each is counted, the first one for an address and reason is logged, and
    `status` shows the last one.
    """

    def __init__(self, clock: Any, fallback: IPolicyForHTTPS | None = None) -> None:
        self._clock = clock
        self._fallback = fallback or BrowserLikePolicyForHTTPS()
        self._pinned: dict[tuple[str, int], BackendMaterial] = {}
        self._rejections = 0
        self._last_rejection: _Rejection | None = None
        self._logged: set[tuple[str, str]] = set()

    def pin(self, address: str, port: int, material: BackendMaterial) -> None:
        """
        Trust `material`'s certificate, and only it, for `address` and `port`.

        A daemon manages one instance, so this replaces any earlier pin.
        """
        self._pinned = {(address, port): material}

    def material_at(self, address: str, port: int) -> BackendMaterial | None:
        """
        Return the material pinned to this address, if any.
        """
        return self._pinned.get((address, port))

    def pinned_material(self) -> BackendMaterial | None:
        """
        Return the material of the pinned instance, if any.
        """
        return next(iter(self._pinned.values()), None)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        material = self.material_at(hostname.decode("ascii").strip("[]"), port)
        if material is None:
            return self._fallback.creatorForNetloc(hostname, port)

        # Twisted (26.10) checks the name with service_identity in the verify
        # callback of each connection, after OpenSSL has checked the chain against
        # the one trust root.
        return optionsForClientTLS(
            SERVICE_NAME,
            trustRoot=Certificate.loadPEM(material.certificate_pem.encode("ascii")),
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )

    def record_rejection(self, address: str, port: int, reason: str) -> None:
        """
        Count a connection to a pinned address whose TLS handshake failed, and
        log it unless the same address failed for the same reason before.
        """
        material = self.material_at(address, port)
        if material is None:
            return

        netloc = _netloc(address, port)
        self._rejections += 1
        self._last_rejection = _Rejection(
            address=netloc,
            instance_id=material.instance_id,
            expected_certificate=material.fingerprint,
            reason=reason,
            at=self._clock.seconds(),
        )
        if (netloc, reason) in self._logged:
            return
        self._logged.add((netloc, reason))
        log.error(
            "Rejected the backend at {address}: the TLS handshake failed "
            "({reason}), so no request was sent. Instance {instance_id} has the "
            "certificate {expected}; a backend that presents any other is refused. "
            "Repeats for this address and reason are only counted in /status",
            address=netloc,
            reason=reason,
            instance_id=material.instance_id,
            expected=material.fingerprint,
        )

    def status(self) -> dict[str, Any]:
        """
        Return the `/status` fields of the backend's TLS, which contain no secret.
        """
        material = self.pinned_material()
        last_rejection = None
        if self._last_rejection is not None:
            last_rejection = attrs.asdict(self._last_rejection)
            moment = datetime.datetime.fromtimestamp(
                last_rejection.pop("at"), tz=datetime.timezone.utc
            )
            last_rejection["time"] = moment.isoformat(timespec="seconds")
        return {
            "service_name": SERVICE_NAME,
            "certificate_sha256": material.fingerprint if material else None,
            "rejected_connections": self._rejections,
            "last_rejection": last_rejection,
        }


@implementer(IAgent)
class BackendAgent:
    """
    An agent that adds the pinned instance's secret to every HTTPS request to it,
    and reports the requests that fail their TLS handshake to the policy.

    Any `Authorization` header of the request is replaced. Requests to other URLs,
    and plain-HTTP requests, are sent unchanged, so the secret never crosses the
    network in clear text.
    """

    def __init__(self, agent: IAgent, policy: BackendTLSPolicy) -> None:
        self._agent = agent
        self._policy = policy

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Any:
        parsed = URI.fromBytes(uri)
        material = None
        if parsed.scheme == b"https":
            address = parsed.host.decode("ascii").strip("[]")
            material = self._policy.material_at(address, parsed.port)
        if material is None:
            return self._agent.request(method, uri, headers, bodyProducer)

        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(
            b"authorization", [f"Bearer {material.bearer_token}".encode("ascii")]
        )

        def check(failure: Failure) -> Failure:
            error = find_tls_error(failure)
            if error is not None:
                self._policy.record_rejection(
                    address, parsed.port, describe_tls_error(error)
                )
            return failure

        requested = self._agent.request(method, uri, headers, bodyProducer)
        return requested.addErrback(check)


def find_tls_error(failure: Failure | BaseException) -> BaseException | None:
    """
    Return the TLS error that made a request fail, looking inside the errors that
    wrap it, or None when the request failed for another reason.
    """
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, (SSL.Error, service_identity.VerificationError)):
        return error
    for reason in getattr(error, "reasons", None) or ():
        found = find_tls_error(reason)
        if found is not None:
            return found
    return None


def describe_tls_error(error: BaseException) -> str:
    """
    Return the reason of a TLS error in a few words, such as "certificate verify
    failed".
    """
    # pyOpenSSL puts OpenSSL's error queue in the first argument, as a list of
    # (library, function, reason) tuples.
    queue = error.args[0] if error.args else None
    if isinstance(queue, list) and queue and isinstance(queue[-1], tuple):
        return str(queue[-1][-1])
    return str(error) or type(error).__name__


__all__ = [
    "BackendAgent",
    "BackendTLSPolicy",
    "describe_tls_error",
    "find_tls_error",
]
