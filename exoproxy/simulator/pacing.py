"""
Write an HTTP response body in timed steps, the way a model streams its tokens.
"""

from __future__ import annotations

from typing import Generator

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

log = Logger()

# A step of a paced body: bytes to write at once, or None to wait one interval.
PacedStep = bytes | None


class PacedWriter:
    """
    A body written from an iterator of steps, with a pause of `interval` seconds at
    each None step.

    Each chunk is written as soon as it is produced, so a streaming client receives
    it at once. When the client disconnects the timer is cancelled and the iterator
    is closed, so nothing more is produced.

    Args:
        clock: The clock for the pauses.
        request: The request to write to. Its status and headers must be set already.
        steps: The steps of the body. The request is finished when they run out.
        interval: The pause at each None step, in seconds.
    """

    def __init__(
        self,
        clock: IReactorTime,
        request: Request,
        steps: Generator[PacedStep, None, None],
        interval: float,
    ) -> None:
        self._clock = clock
        self._request = request
        self._steps = steps
        self._interval = interval
        self._timer: IDelayedCall | None = None
        self._done = False
        request.notifyFinish().addBoth(self._request_finished)

    def start(self) -> None:
        """
        Write the steps up to the first pause, and schedule the rest.
        """
        self._advance()

    def _advance(self) -> None:
        self._timer = None
        while not self._done:
            try:
                step = next(self._steps)
            except StopIteration:
                self._done = True
                self._request.finish()
                return

            if step is None:
                self._timer = self._clock.callLater(self._interval, self._advance)
                return
            self._request.write(step)

    def _request_finished(self, result: None | Failure) -> None:
        if isinstance(result, Failure) and not self._done:
            log.debug("Client disconnected from a paced response")
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._steps.close()
