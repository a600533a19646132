"""
The types that the instance lifecycle shares with the rest of the daemon: the backend
that it serves, the provisioner that it drives and the inputs of its state machine.
"""

from __future__ import annotations

from typing import Callable, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

# The reasons for a stop, as `/status` shows them.
STOPPED_WHEN_IDLE = "idle"
STOPPED_FOR_UPTIME = "max-instance-hours"


@attrs.frozen
class Backend:
    """
    An Ollama server that is ready to take requests.
    """

    url: str
    instance_id: str | None = None


class ShuttingDown(Exception):
    """
    The daemon is shutting down, so no instance is brought up any more.
    """

    def __init__(self) -> None:
        super().__init__("exoproxy is shutting down")


class Provisioner(Protocol):
    def bring_up(
        self,
        set_phase: Callable[[str], None],
        needed: Callable[[], bool] | None = None,
        previous: Backend | None = None,
    ) -> Deferred[Backend | None]:
        """
        Find, start or create the instance and wait until Ollama serves the model.

        While C{needed()} is false, only adopt a running instance, and fire with
        None when there is none. When C{previous} still responds, fire with it.
        """

    def shut_down(self, instance_id: str) -> Deferred[None]:
        """
        Stop or destroy the instance, as the idle action selects.
        """

    def known_instance_id(self) -> str | None:
        """
        Return the id of the instance that the last run found or created.
        """


class Lifecycle(Protocol):
    def demand(self) -> None:
        "A request needs the instance."

    def adopt(self) -> None:
        "The daemon has started, and a running instance of its own may exist."

    def retry(self) -> None:
        "The backoff after a failed run has passed and a request needs the instance."

    def instance_ready(self, backend: Backend) -> None:
        "Ollama on the instance answers and lists the model."

    def nothing_to_adopt(self) -> None:
        "The run found no running instance, and no request needs one."

    def provisioning_failed(self, failure: Failure) -> None:
        "The provisioning run failed."

    def backend_lost(self, reason: str) -> None:
        "A request could not connect to the backend, or it broke off a response."

    def idle_expired(self) -> None:
        "No request has been in flight for the idle timeout."

    def stop_retry_due(self) -> None:
        "In error, the idle timeout and the backoff after a failed stop have passed."

    def uptime_exceeded(self) -> None:
        "The instance has been up for the maximum uptime."

    def stop_finished(self) -> None:
        "The instance has stopped or been destroyed."

    def stop_failed(self, failure: Failure) -> None:
        "Stopping or destroying the instance failed."

    def state_name(self) -> str:
        "The name of the current state."

    def current_backend(self) -> Backend | None:
        "The backend to proxy to, when the state is ready."
