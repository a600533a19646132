"""
The HTTP routes of Ollama's API that exoproxy serves, and what each one needs.
"""

from __future__ import annotations

import re

import attrs

_BLOB_DIGEST = r"sha256[:-][0-9a-fA-F]{64}"


@attrs.frozen
class Route:
    """
    One route of Ollama's API.

    Attributes:
        pattern: a regular expression that matches the whole path.
        methods: the methods that the route accepts; HEAD is listed only where
            Ollama serves it.
        json_body: whether the request body must be a JSON object.
    """

    pattern: re.Pattern[str]
    methods: frozenset[bytes]
    json_body: bool = False


def _route(path: str, *methods: str, json_body: bool | None = None) -> Route:
    encoded = frozenset(method.encode("ascii") for method in methods)
    if json_body is None:
        json_body = bool(encoded & {b"POST", b"DELETE"})
    return Route(
        pattern=re.compile(f"^{path}$"),
        methods=encoded,
        json_body=json_body,
    )


# Routes of Ollama 0.5 to 0.12 (server/routes.go), and its OpenAI-compatible API.
ROUTES: tuple[Route, ...] = (
    _route("/api/version", "GET", "HEAD"),
    _route("/api/tags", "GET", "HEAD"),
    _route("/api/ps", "GET"),
    _route("/api/generate", "POST"),
    _route("/api/chat", "POST"),
    _route("/api/embed", "POST"),
    _route("/api/embeddings", "POST"),
    _route("/api/show", "POST"),
    _route("/api/pull", "POST"),
    _route("/api/push", "POST"),
    _route("/api/create", "POST"),
    _route("/api/copy", "POST"),
    _route("/api/delete", "DELETE"),
    # A blob upload is raw bytes, not JSON.
    _route(f"/api/blobs/{_BLOB_DIGEST}", "HEAD", "POST", json_body=False),
    _route("/v1/chat/completions", "POST"),
    _route("/v1/completions", "POST"),
    _route("/v1/embeddings", "POST"),
    _route("/v1/models", "GET"),
    _route("/v1/models/.+", "GET"),
)


# The polling routes that exoproxy can serve from memory while the instance is not
# ready. Clients such as Open WebUI and editor plugins poll them every few seconds,
# so they must neither start the instance nor count as activity.
LOCAL_CAPABLE_ROUTES = frozenset({"/api/version", "/api/tags", "/api/ps", "/v1/models"})
DEFAULT_LOCAL_ROUTES = LOCAL_CAPABLE_ROUTES


def parse_local_routes(value: str) -> frozenset[str]:
    """
    Parse a comma-separated list of local routes; an empty value makes every route
    wake the instance.

    Raises:
        ValueError: a path is not one that exoproxy can serve locally.
    """
    paths = frozenset(part.strip() for part in value.split(",") if part.strip())
    unknown = paths - LOCAL_CAPABLE_ROUTES
    if unknown:
        raise ValueError(
            f"cannot serve {', '.join(sorted(unknown))} locally; choose from "
            f"{', '.join(sorted(LOCAL_CAPABLE_ROUTES))}"
        )
    return paths


class RouteNotFound(LookupError):
    """
    No route has this path.
    """


class MethodNotAllowed(LookupError):
    """
    A route has this path, but not with this method.
    """

    def __init__(self, allowed: frozenset[bytes]) -> None:
        super().__init__("method not allowed")
        self.allowed = allowed


def match_route(method: bytes, path: str) -> Route:
    """
    Return the route for a request.

    Raises:
        RouteNotFound: no route has this path.
        MethodNotAllowed: the path exists but not with this method; the
            exception carries the allowed methods for the Allow header.
    """
    for route in ROUTES:
        if route.pattern.match(path):
            if method in route.methods:
                return route
            raise MethodNotAllowed(route.methods)
    raise RouteNotFound(path)


def streams_request_body(method: bytes, path: bytes) -> bool:
    """
    Return whether a request's body is relayed while it arrives instead of first
    being received whole: true for blob uploads, which can be many GiB.
    """
    return method == b"POST" and path.startswith(b"/api/blobs/")
