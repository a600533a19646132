"""
The access log: one structured event for each HTTP request, with its target
redacted, and the request counts that the metrics take from it.

Each event is logged in the namespace "exoproxy.access" with the fields client,
method, path, protocol, status, bytes, duration (seconds), route, held,
unavailable and completed, so a JSON log has them as separate keys.
"""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import unquote

from twisted.logger import Logger
from twisted.web.server import Request, Site

from exoproxy.channel import ExoproxyChannel
from exoproxy.metrics import DaemonMetrics, route_label

log = Logger(namespace="exoproxy.access")

# Blob digests are long hex strings, but they name content, not credentials.
_DIGEST = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")

# Prefixes of widely used credentials: OpenAI-style "sk-" keys, Exoscale API keys
# ("EXO" and 24 hex digits), JSON Web Tokens, GitHub, Slack and Hugging Face tokens,
# and a bearer token pasted into a URL.
_TOKEN_PREFIX = re.compile(
    r"^(sk-|EXO[0-9a-fA-F]{16}|eyJ[A-Za-z0-9_-]{10}|gh[pousr]_|github_pat_|"
    r"xox[abprs]-|hf_[A-Za-z0-9]{10}|bearer[ :])",
    re.IGNORECASE,
)

# A run of 32 or more characters of the base64 and hex alphabets, with a letter and
# a digit: random keys look like this, while model names such as
# "DeepSeek-R1-Distill-Qwen-32B-GGUF" are broken up by hyphens and dots.
_RANDOM_RUN = re.compile(r"[A-Za-z0-9+/=_]{32,}")

REDACTED = "[redacted]"


def looks_like_token(text: str) -> bool:
    """
    Return whether a path segment or query value looks like a credential.
    """
    if _DIGEST.match(text):
        return False
    if _TOKEN_PREFIX.match(text):
        return True
    for run in _RANDOM_RUN.findall(text):
        if re.search(r"[A-Za-z]", run) and re.search(r"[0-9]", run):
            return True
    return False


# Clients send the same few targets again and again, so the redacted form of the
# most recent ones is kept.
@functools.lru_cache(maxsize=512)
def redact_target(target: bytes) -> str:
    """
    Return a request target for the log: every query value and every path segment
    that looks like a credential become "[redacted]".

    Query names are kept unless they look like a credential themselves.
    """
    text = target.decode("utf-8", "replace")
    path, question, query = text.partition("?")

    segments = [
        REDACTED if looks_like_token(unquote(segment)) else segment
        for segment in path.split("/")
    ]
    redacted = "/".join(segments)
    if not question:
        return redacted

    parameters = []
    for parameter in query.split("&"):
        name, equals, _value = parameter.partition("=")
        if looks_like_token(unquote(name)):
            name = REDACTED
        parameters.append(f"{name}={REDACTED}" if equals else name)
    return f"{redacted}?{'&'.join(parameters)}"


class AccessLoggedRequest(Request):
    """
    A request that records when it arrived and is logged once when it ends, also
    when its connection is lost before its response has finished.

    Attributes:
        held: set by the gateway when the request waits for the instance to be
            ready, instead of getting 503 at once.
        received_at: the site clock's time when the request line arrived.
    """

    held: bool = False
    received_at: float = 0.0
    _access_logged = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site = getattr(channel, "site", None)
        if isinstance(site, AccessLogSite):
            site.request_started(self)

    def connectionLost(self, reason: Any) -> None:
        # The base class drops the channel, and with it the way to the site.
        channel = getattr(self, "channel", None)
        site = getattr(channel, "site", None)
        super().connectionLost(reason)
        if not self.finished and isinstance(site, AccessLogSite):
            site.request_ended(self, completed=False)


class AccessLogSite(Site):
    """
    A site that logs each request as a structured event and counts it in the
    metrics, in place of twisted.web's access log file. Its connections are
    L{ExoproxyChannel}s.

    Its requests must be L{AccessLoggedRequest}s, so that they are logged.
    """

    requestFactory = AccessLoggedRequest
    protocol = ExoproxyChannel

    def __init__(
        self, resource: Any, *, metrics: DaemonMetrics | None = None, **kwargs: Any
    ) -> None:
        super().__init__(resource, **kwargs)
        self._metrics = metrics
        self._request_counters: dict[tuple[str, str], Any] = {}

    def startFactory(self) -> None:
        # HTTPFactory opens its log file here and starts a timer that refreshes
        # the log date every second; neither is used, because log() is replaced.
        pass

    def stopFactory(self) -> None:
        pass

    def request_started(self, request: AccessLoggedRequest) -> None:
        request.received_at = self.reactor.seconds()
        if self._metrics is not None:
            self._metrics.requests_in_flight.inc()

    def _count(self, route: str, status: str) -> None:
        # prometheus_client's labels() takes a lock and checks the label values on
        # every call, so the counter of each route and status is kept here.
        counter = self._request_counters.get((route, status))
        if counter is None:
            counter = self._metrics.requests.labels(route=route, status=status)
            self._request_counters[(route, status)] = counter
        counter.inc()

    def log(self, request: Request) -> None:
        """
        Log a request whose response has finished; twisted.web calls this from
        Request.finish.
        """
        self.request_ended(request, completed=True)

    def request_ended(self, request: Request, *, completed: bool) -> None:
        """
        Log a request and count it, once, however it ended.
        """
        if getattr(request, "_access_logged", False):
            return
        request._access_logged = True
        if self._metrics is not None and isinstance(request, AccessLoggedRequest):
            self._metrics.requests_in_flight.dec()

        client = getattr(request.getClientAddress(), "host", "-")
        if request.path is None:
            # The connection closed before the request line and headers were
            # complete, so there is no request to log or count.
            log.debug(
                "A connection from {client} closed before its request was complete",
                client=client,
            )
            return

        method = request.method.decode("ascii", "replace")
        route = route_label(request.path.decode("utf-8", "replace"))
        status = request.code if completed or request.startedWriting else None
        duration = self.reactor.seconds() - getattr(request, "received_at", 0.0)
        if self._metrics is not None:
            self._count(route, str(status) if status else "aborted")

        path = redact_target(request.uri)
        protocol = request.clientproto.decode("ascii", "replace")
        shown_status = status if status else "-"
        line = (
            f'{client} "{method} {path} {protocol}" {shown_status} '
            f"{request.sentLength} {duration:.3f}s{_note(request, status, completed)}"
        )
        # The line is formatted here and passed as a format without fields, with
        # its braces doubled. twisted.logger (26.10) formats a format's fields with
        # string.Formatter and one wrapper object each, which took more than half
        # of the access log's cost. The named fields still reach the JSON log.
        log.info(
            line.replace("{", "{{").replace("}", "}}"),
            client=client,
            method=method,
            path=path,
            protocol=protocol,
            status=shown_status,
            bytes=request.sentLength,
            duration=round(duration, 6),
            route=route,
            held=bool(getattr(request, "held", False)),
            unavailable=status == 503,
            completed=completed,
        )


def _note(request: Request, status: int | None, completed: bool) -> str:
    notes = []
    if getattr(request, "held", False):
        notes.append("held")
    if status == 503:
        notes.append("unavailable")
    if not completed:
        notes.append("connection lost before the response ended")
    return f" ({', '.join(notes)})" if notes else ""
