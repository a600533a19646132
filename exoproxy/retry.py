"""
When to try a failed step again: capped exponential backoff with jitter, and the
Retry-After header of an HTTP response.

The shape follows `twisted.application._client_service.backoffPolicy`: the delay
grows by a factor on each failed attempt up to a maximum. Half of each delay is
random, so that several daemons that failed together do not retry together.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime
from typing import Callable

import attrs

# The longest Retry-After that is honoured. A longer one is cut to this, so that a
# malformed header cannot stall a step for hours.
MAX_RETRY_AFTER = 600.0


@attrs.frozen
class RetryPolicy:
    """
    The number of attempts of a failed step, and the delays between them.

    Attributes:
        attempts: the number of attempts in all, the first one included.
        initial_delay: the delay after the first failed attempt, in seconds,
            before jitter.
        max_delay: the cap of the delay, in seconds, before jitter.
        factor: how much the delay grows after each failed attempt.
        jitter: returns a number in [0, 1); the delay is `delay * (1 + j) / 2`.
    """

    attempts: int = 5
    initial_delay: float = 1.0
    max_delay: float = 30.0
    factor: float = 2.0
    jitter: Callable[[], float] = attrs.field(default=random.random, eq=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """
        Return the seconds to wait after failed attempt number C{attempt}, which
        is 1 for the first attempt.

        A C{retry_after} from the server is a lower bound, up to
        L{MAX_RETRY_AFTER}.
        """
        try:
            backoff = self.initial_delay * self.factor ** min(attempt - 1, 100)
        except OverflowError:
            backoff = self.max_delay
        backoff = min(backoff, self.max_delay)
        delay = backoff * (1 + self.jitter()) / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    Parse a Retry-After header into seconds from C{now}, or return None when it is
    missing or invalid.

    RFC 9110, section 10.2.3, allows a number of seconds or an HTTP date.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now)
