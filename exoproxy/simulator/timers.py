"""
The delays of the simulated cloud, and the timers that act them out.

Every delay in the simulator goes through a `TimerSet`, so that stopping the simulator
cancels every timer it started and leaves nothing pending in the reactor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


@dataclass(frozen=True)
class SimulatorTimings:
    """
    The delays of the simulated cloud, in seconds.

    The defaults are short versions of what a real GPU instance takes, which is
    minutes. Tests pass values of a few tens of milliseconds.

    Attributes:
        operation_delay: From an API operation being `pending` to its `success`. A
            deleted instance also disappears after this delay.
        start_delay: From instance state `starting` to `running`.
        stop_delay: From `stopping` to `stopped`.
        boot_delay: From `running` to cloud-init done and Ollama listening.
        pull_delay: From Ollama listening to one pulled model being listed, and the
            duration of an `/api/pull`.
        token_interval: Between two generated tokens.
    """

    operation_delay: float = 0.2
    start_delay: float = 1.0
    stop_delay: float = 0.5
    boot_delay: float = 1.5
    pull_delay: float = 1.0
    token_interval: float = 0.05

    def __post_init__(self) -> None:
        for timing in fields(self):
            value = getattr(self, timing.name)
            if not value >= 0:
                raise ValueError(
                    f"{timing.name} must be 0 or more seconds, not {value}"
                )


class TimerSet:
    """
    Timers scheduled on one clock, tracked until they fire or are cancelled.

    Args:
        clock: The clock that runs every timer of this set.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._pending: set[IDelayedCall] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def call_later(
        self, delay: float, function: Callable[..., Any], *args: Any
    ) -> IDelayedCall:
        """
        Schedule `function(*args)` after `delay` seconds.

        An exception raised by `function` is logged, not propagated, so one failing
        simulated event does not stop the others.

        Returns:
            The timer, which the caller may pass to `cancel`.
        """
        call: IDelayedCall

        def fire() -> None:
            self._pending.discard(call)
            try:
                function(*args)
            except Exception:
                log.failure("Simulated event {function!r} failed", function=function)

        call = self._clock.callLater(delay, fire)
        self._pending.add(call)
        return call

    def cancel(self, call: IDelayedCall | None) -> None:
        """
        Cancel `call` if it is still pending. Passing None or a fired timer is allowed.
        """
        if call is None or call not in self._pending:
            return

        self._pending.discard(call)
        call.cancel()

    def cancel_all(self) -> None:
        """
        Cancel every pending timer of this set.
        """
        pending, self._pending = self._pending, set()
        for call in pending:
            call.cancel()
