"""
Requests in flight, and how long the daemon has been without one.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class ActivityTracker:
    """
    Count the requests that need the instance, from their start until their
    response body has finished, streams included.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.in_flight = 0
        self.last_activity = clock.seconds()

    def request_started(self) -> None:
        self.in_flight += 1
        self.last_activity = self._clock.seconds()

    def request_finished(self) -> None:
        """
        Record the end of a request; the idle time starts when the last one ends.
        """
        self.in_flight -= 1
        self.last_activity = self._clock.seconds()

    def touch(self) -> None:
        """
        Restart the idle time, for example when the instance has become ready.
        """
        self.last_activity = self._clock.seconds()

    def idle_for(self) -> float:
        """
        Return the seconds since the last request ended, or 0 while one is in flight.
        """
        if self.in_flight:
            return 0.0
        return self._clock.seconds() - self.last_activity
