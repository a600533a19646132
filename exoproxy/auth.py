"""
Bearer tokens that LAN clients send to exoproxy, as `Authorization: Bearer TOKEN`.

ollama-python sends its `OLLAMA_API_KEY` environment variable this way, so a client
of the official library passes a token by setting that variable.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from exoproxy.config import ConfigError

log = Logger()

#: The name of the systemd credential (`LoadCredential=exoproxy-api-keys:PATH`)
#: that lists the tokens, one per line.
CREDENTIAL_NAME = "exoproxy-api-keys"

#: The shortest token that is accepted, so that no token is easy to guess.
MIN_TOKEN_LENGTH = 16

# RFC 6750's b64token, the syntax of a bearer token.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")

# Seconds between two log lines about rejected requests.
_LOG_INTERVAL = 60.0


def parse_tokens(text: str, source: str) -> tuple[str, ...]:
    """
    Parse tokens from text with one token a line. Blank lines and lines that start
    with `#` are ignored, and so is the whitespace around a token.

    Args:
        source: Where the text came from, such as "--api-key-file 'keys.txt'", to
            start the error message with.

    Raises:
        ConfigError: A line is not a valid token, or there is no token at all. The
            message gives the line number but never the line.
    """
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if _TOKEN.fullmatch(token) is None:
            raise ConfigError(
                f"{source}: line {number} is not a valid bearer token; use "
                "letters, digits and . _ ~ + / - only"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"{source}: the token on line {number} is shorter than "
                f"{MIN_TOKEN_LENGTH} characters; generate one with "
                "`openssl rand -hex 32`"
            )
        tokens.append(token)
    if not tokens:
        raise ConfigError(f"{source}: no token found")
    return tuple(tokens)


def read_tokens(path: str) -> tuple[str, ...]:
    """
    Read the tokens of a token file.

    Raises:
        ConfigError: The file cannot be read or contains no valid token.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"--api-key-file: cannot read {path!r}: {reason}") from None
    return parse_tokens(text, f"--api-key-file {path!r}")


class ClientTokens:
    """
    The tokens that clients may send, checked in constant time.

    Every check compares the sent token with every accepted token through
    `hmac.compare_digest`, so the time it takes does not tell which token, or
    which prefix of one, was close.
    """

    def __init__(self, tokens: Iterable[str], clock: IReactorTime) -> None:
        self._tokens = tuple(token.encode("ascii") for token in tokens)
        if not self._tokens:
            raise ValueError("ClientTokens needs at least one token")
        self._clock = clock
        self._rejected_since_log = 0
        self._logged_at: float | None = None
        self.rejected = 0

    def accepts(self, request: Request) -> bool:
        """
        Return whether the request carries exactly one `Authorization` header with
        an accepted bearer token.
        """
        values = request.requestHeaders.getRawHeaders(b"authorization", [])
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110, section 11.1).
        if scheme.lower() != b"bearer":
            return False

        token = token.strip()
        accepted = False
        for candidate in self._tokens:
            accepted |= hmac.compare_digest(token, candidate)
        return accepted

    def record_rejection(self, request: Request, path: str) -> None:
        """
        Count a rejected request, and log it unless a line was logged less than a
        minute ago. The next line gives the count of the requests in between.
        """
        self.rejected += 1
        self._rejected_since_log += 1
        now = self._clock.seconds()
        if self._logged_at is not None and now - self._logged_at < _LOG_INTERVAL:
            return

        client = request.getClientAddress()
        log.warn(
            "Rejected {method} {path} from {client}: no valid API key "
            "({count} rejected since the last such line)",
            method=request.method.decode("ascii", "replace"),
            path=path,
            client=getattr(client, "host", "-"),
            count=self._rejected_since_log,
        )
        self._logged_at = now
        self._rejected_since_log = 0
