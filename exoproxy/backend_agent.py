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
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
)
from zope.interface import implementer

from exoproxy.backend_tls import SERVICE_NAME, BackendMaterial

log = Logger()

# Backend URLs come from the configuration and from the managed instance, so a
# daemon uses one or two. This bound only keeps a long run of instances, each
# with an address of its own, from growing the caches below.
_MAX_CACHED = 16


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
        # Connection creators by (host, port), reused for every connection,
        # because each one contains an OpenSSL context, which is costly to build.
        self._creators: dict[tuple[bytes, int], Any] = {}
        self._rejections = 0
        self._last_rejection: _Rejection | None = None
        self._logged: set[tuple[str, str]] = set()

    def pin(self, address: str, port: int, material: BackendMaterial) -> None:
        """
        Trust `material`'s certificate, and only it, for `address` and `port`.

        A daemon manages one instance, so this replaces any earlier pin.
        """
        self._pinned = {(address, port): material}
        self._creators = {}

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
        creator = self._creators.get((hostname, port))
        if creator is not None:
            return creator

        material = self.material_at(hostname.decode("ascii").strip("[]"), port)
        if material is None:
            creator = self._fallback.creatorForNetloc(hostname, port)
        else:
            # Twisted (26.10) checks the name with service_identity in the verify
            # callback of each connection, after OpenSSL has checked the chain
            # against the one trust root.
            creator = optionsForClientTLS(
                SERVICE_NAME,
                trustRoot=Certificate.loadPEM(material.certificate_pem.encode("ascii")),
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
            )
        if len(self._creators) >= _MAX_CACHED:
            self._creators.clear()
        self._creators[(hostname, port)] = creator
        return creator

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
        # Only an HTTPS URL can be pinned, so other requests skip parsing the URL.
        if not uri.startswith(b"https:"):
            return self._agent.request(method, uri, headers, bodyProducer)
        parsed = URI.fromBytes(uri)
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


@implementer(IAgentEndpointFactory)
class BackendEndpoints:
    """
    The endpoints of the backend agent: TCP for `http` URLs and TLS over TCP for
    `https` URLs, as Twisted's `Agent` builds them, but built once for each scheme,
    host and port instead of once for each request.

    Building a `HostnameEndpoint` encodes the host name with IDNA, and that took
    about a tenth of exoproxy's CPU time for each small request (see
    docs/benchmarks.md). An `https` endpoint is built again when the policy
    returns another connection creator for its host, as it does when another
    instance is pinned.
    """

    def __init__(
        self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float | None
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], tuple[Any, Any]] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        if uri.scheme == b"http":
            creator = None
        elif uri.scheme == b"https":
            creator = self._policy.creatorForNetloc(uri.host, uri.port)
        else:
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")

        cached = self._endpoints.get(key)
        if cached is not None and cached[0] is creator:
            return cached[1]

        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(
                f"invalid backend host {uri.host!r}: it must be ASCII"
            ) from None
        options = {}
        if self._connect_timeout is not None:
            options["timeout"] = self._connect_timeout
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, host, uri.port, **options
        )
        if creator is not None:
            endpoint = wrapClientTLS(creator, endpoint)
        if len(self._endpoints) >= _MAX_CACHED:
            self._endpoints.clear()
        self._endpoints[key] = (creator, endpoint)
        return endpoint


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
    "BackendEndpoints",
    "BackendTLSPolicy",
    "describe_tls_error",
    "find_tls_error",
]
