"""
Measure what the backend agent spends on endpoints for each request, with Twisted's
own endpoint factory and with exoproxy's cached one, in the same run.

    python -m bench.endpointcost

Twisted's `Agent` (26.10) gets an endpoint from its endpoint factory for every
request. For an `https` URL that factory also gets a connection creator from the TLS
policy, and a creator for a pinned certificate loads the certificate and builds an
OpenSSL context. Nothing here connects: it only builds endpoints for 127.0.0.1 URLs.
"""

from __future__ import annotations

import argparse
import sys
import timeit

from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.web.client import URI, _StandardEndpointFactory

from exoproxy.backend_agent import BackendEndpoints, BackendTLSPolicy
from exoproxy.backend_tls import SERVICE_NAME, generate_material


class _UncachedPolicy(BackendTLSPolicy):
    """
    The policy as it was before it kept its creators: one new creator per call.
    """

    def creatorForNetloc(self, hostname: bytes, port: int):
        material = self.material_at(hostname.decode("ascii"), port)
        return optionsForClientTLS(
            SERVICE_NAME,
            trustRoot=Certificate.loadPEM(material.certificate_pem.encode("ascii")),
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )


def _microseconds(build, uri: URI, number: int) -> float:
    return timeit.timeit(lambda: build(uri), number=number) / number * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.endpointcost")
    parser.add_argument("--number", type=int, default=2000, help="builds per figure")
    arguments = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from twisted.internet import reactor

    material = generate_material(reactor.seconds())
    uncached, cached = _UncachedPolicy(reactor), BackendTLSPolicy(reactor)
    for policy in (uncached, cached):
        policy.pin("127.0.0.1", 11443, material)
    twisted_factory = _StandardEndpointFactory(reactor, uncached, 30, None)
    exoproxy_factory = BackendEndpoints(reactor, cached, 30)

    print("| URL | Twisted's factory (µs) | BackendEndpoints (µs) | ratio |")
    print("| --- | --- | --- | --- |")
    for url in (
        b"http://127.0.0.1:11434/api/show",
        b"https://127.0.0.1:11443/api/show",
    ):
        uri = URI.fromBytes(url)
        before = _microseconds(twisted_factory.endpointForURI, uri, arguments.number)
        after = _microseconds(exoproxy_factory.endpointForURI, uri, arguments.number)
        print(f"| {url.decode()} | {before:.1f} | {after:.2f} | {after / before:.3f} |")


if __name__ == "__main__":
    main()
