"""
Cross-origin requests, answered as Ollama answers them by default.

exoproxy answers CORS itself and does not forward the Origin header, so the backend
neither rejects the origin nor adds a second Access-Control-Allow-Origin header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from twisted.web.server import Request

from exoproxy.config import ConfigError

# Ollama's default origins (envconfig.AllowedOrigins in Ollama 0.5 to 0.12), to which
# OLLAMA_ORIGINS adds more.
OLLAMA_DEFAULT_ORIGINS: tuple[str, ...] = tuple(
    f"{scheme}://{host}{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for scheme in ("http", "https")
    for port in ("", ":*")
) + ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")

# Ollama sets gin-contrib/cors's AllowBrowserExtensions, which admits these schemes.
_EXTENSION_SCHEMES = (
    "chrome-extension://",
    "safari-extension://",
    "moz-extension://",
    "ms-browser-extension://",
)

ALLOWED_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
ALLOWED_HEADERS = (
    b"Authorization, Content-Type, User-Agent, Accept, X-Requested-With, "
    b"X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-Os, "
    b"X-Stainless-Arch, X-Stainless-Retry-Count, X-Stainless-Runtime, "
    b"X-Stainless-Runtime-Version, X-Stainless-Async, X-Stainless-Helper-Method, "
    b"X-Stainless-Poll-Helper, X-Stainless-Custom-Poll-Interval, "
    b"X-Stainless-Timeout"
)
_MAX_AGE = b"43200"


# An origin as browsers send it, scheme://host[:port] with no path, or one that
# contains * as a wildcard, or * alone.
_ORIGIN = re.compile(r"^(\*|[a-z][a-z0-9+.-]*://[^/\s?#]+)$", re.IGNORECASE)


def parse_origins(
    values: Iterable[str], source: str = "--allow-origin"
) -> tuple[str, ...]:
    """
    Check the origins of `--allow-origin` or OLLAMA_ORIGINS; `source` names the
    one that the values come from, in the error.

    Raises:
        ConfigError: a value is not an origin, such as a bare host name, a URL
            with a path or a port above 65535. No browser sends such an Origin
            header, so the value would never match and the browser client would
            fail without a hint.
    """
    values = tuple(values)
    for value in values:
        port = value.rpartition(":")[2]
        if _ORIGIN.match(value) and not (port.isdigit() and int(port) > 65535):
            continue
        raise ConfigError(
            f"{source}: invalid origin {value!r}; use scheme://host or "
            "scheme://host:port with no path, such as https://webui.example.com, "
            "with * as a wildcard, as in http://*.lan:*"
        )
    return values


def _pattern(origin: str) -> re.Pattern[str]:
    parts = (re.escape(part) for part in origin.split("*"))
    return re.compile("^" + ".*".join(parts) + "$", re.IGNORECASE)


class CorsPolicy:
    """
    The origins that may call exoproxy from a browser.
    """

    def __init__(self, extra_origins: Iterable[str] = ()) -> None:
        origins = tuple(extra_origins) + OLLAMA_DEFAULT_ORIGINS
        self._patterns = tuple(_pattern(origin) for origin in origins)

    def allows(self, origin: str) -> bool:
        if origin.lower().startswith(_EXTENSION_SCHEMES):
            return True
        return any(pattern.match(origin) for pattern in self._patterns)

    def is_preflight(self, request: Request) -> bool:
        return request.method == b"OPTIONS" and request.requestHeaders.hasHeader(
            b"access-control-request-method"
        )

    def add_headers(self, request: Request, origin: bytes) -> None:
        """
        Add the headers that allow C{origin} to read the response.
        """
        request.setHeader(b"access-control-allow-origin", origin)
        request.responseHeaders.addRawHeader(b"vary", b"Origin")

    def answer_preflight(self, request: Request, origin: bytes) -> bytes:
        request.setResponseCode(204)
        self.add_headers(request, origin)
        request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
        request.setHeader(b"access-control-allow-headers", ALLOWED_HEADERS)
        request.setHeader(b"access-control-max-age", _MAX_AGE)
        return b""
