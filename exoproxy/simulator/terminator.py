"""
The simulated TLS terminator of an instance: what the user-data's nginx would do.

The user-data of exoproxy writes an nginx site that listens with TLS on the backend
port, rejects requests without the bearer secret with 401, and proxies the rest to
Ollama on loopback. The simulator reads the port, the certificate, the key and the
secret from those files and serves its Ollama behind a Twisted TLS listener that
checks the same secret, so that exoproxy's real client path is exercised.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

log = Logger()

#: The nginx site that the user-data writes.
NGINX_SITE_PATH = "/etc/nginx/conf.d/exoproxy.conf"

_LISTEN = re.compile(r"^\s*listen\s+(?:\S+:)?(?P<port>\d+)\s+ssl\b", re.MULTILINE)
_CERTIFICATE = re.compile(r"^\s*ssl_certificate\s+(?P<path>\S+);", re.MULTILINE)
_PRIVATE_KEY = re.compile(r"^\s*ssl_certificate_key\s+(?P<path>\S+);", re.MULTILINE)
_INCLUDE = re.compile(r"^\s*include\s+(?P<path>\S+);", re.MULTILINE)
_BEARER_CHECK = re.compile(r'\$http_authorization\s*!=\s*"Bearer (?P<token>[^"]+)"')


@dataclass(frozen=True)
class SimulatedTerminator:
    """
    The TLS listener that fronts a simulated instance's Ollama.

    Attributes:
        port: The public TCP port, from the site's `listen ... ssl` line.
        certificate_pem: The certificate at the site's `ssl_certificate` path.
        private_key_pem: The key at the site's `ssl_certificate_key` path.
        bearer_token: The secret of the `$http_authorization` check in a file that
            the site includes.
    """

    port: int
    certificate_pem: str
    private_key_pem: str = field(repr=False)
    bearer_token: str = field(repr=False)

    def tls_options(self) -> CertificateOptions:
        """
        Build the server TLS options with this certificate and key.
        """
        pair = PrivateCertificate.loadPEM(self.certificate_pem + self.private_key_pem)
        return pair.options()


def find_terminator(files: Mapping[str, str]) -> SimulatedTerminator | None:
    """
    Read the terminator from the `write_files` contents, by path.

    Returns:
        The terminator, or None when the user-data writes no nginx site.

    Raises:
        ValueError: The site lacks a TLS port, a certificate, a key or a bearer
            check, or names a file that the user-data does not write.
    """
    site = files.get(NGINX_SITE_PATH)
    if site is None:
        return None

    listen = _LISTEN.search(site)
    certificate = _CERTIFICATE.search(site)
    private_key = _PRIVATE_KEY.search(site)
    if listen is None or certificate is None or private_key is None:
        raise ValueError(
            f"{NGINX_SITE_PATH} has no `listen PORT ssl`, ssl_certificate or "
            "ssl_certificate_key line"
        )

    token = None
    for include in _INCLUDE.finditer(site):
        check = _BEARER_CHECK.search(files.get(include["path"], ""))
        if check is not None:
            token = check["token"]
    if token is None:
        raise ValueError(
            f"{NGINX_SITE_PATH} includes no file with an $http_authorization check"
        )

    def content(path: str) -> str:
        if path not in files:
            raise ValueError(f"{NGINX_SITE_PATH} names {path}, which is not written")
        return files[path]

    return SimulatedTerminator(
        port=int(listen["port"]),
        certificate_pem=content(certificate["path"]),
        private_key_pem=content(private_key["path"]),
        bearer_token=token,
    )


class BearerGuard(Resource):
    """
    Reject a request without the bearer secret with 401, as the nginx site does,
    and pass the others on without their `Authorization` header.

    Attributes:
        accepted: The number of requests that carried the secret.
        rejected: The number of requests that did not.
    """

    isLeaf = True

    def __init__(self, inner: IResource, bearer_token: str) -> None:
        super().__init__()
        self._inner = inner
        self._expected = f"Bearer {bearer_token}".encode("ascii")
        self.accepted = 0
        self.rejected = 0

    def render(self, request: Request) -> bytes | int:
        sent = request.requestHeaders.getRawHeaders(b"authorization", [])
        if len(sent) != 1 or not hmac.compare_digest(sent[0], self._expected):
            self.rejected += 1
            log.info(
                "Simulated terminator rejected {method} {path} without the bearer "
                "secret",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"),
            )
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            return json.dumps({"error": "unauthorized"}).encode()

        self.accepted += 1
        request.requestHeaders.removeHeader(b"authorization")
        return self._inner.render(request)
