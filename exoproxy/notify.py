"""
Readiness and status notifications to the service manager, as sd_notify(3) describes.

systemd passes the address of a datagram socket in `$NOTIFY_SOCKET` to a unit with
`Type=notify`. A message is one datagram of newline-separated `NAME=value` lines:
`READY=1` once the daemon listens, `STATUS=...` for a line that `systemctl status`
shows, and `STOPPING=1` when it shuts down. Without `$NOTIFY_SOCKET` nothing is sent.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

import attrs
from twisted.logger import Logger

log = Logger()


def _socket_address(value: str) -> str | None:
    """
    Return the address to send to, or None when the form is not supported.
    """
    # A leading "@" names a socket in the Linux abstract namespace, whose address
    # starts with a NUL byte instead (sd_notify(3), unix(7)).
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def status_line(state: str, phase: str, error: str | None = None) -> str:
    """
    Return the STATUS text for a lifecycle state and phase, such as
    "provisioning: waiting for boot", "ready" or "idle: instance stopped".
    """
    if state == "idle" and phase == "stopped":
        return "idle: instance stopped"
    if state == "error" and error:
        return f"error: {error}"
    if phase == state:
        return state
    return f"{state}: {phase}"


@attrs.define
class SystemdNotifier:
    """
    A sender of sd_notify messages.

    Attributes:
        address: the value of `$NOTIFY_SOCKET`, or None, which makes every method
            a no-op.
    """

    address: str | None
    _socket: socket.socket | None = attrs.field(default=None, init=False)
    _failures: int = attrs.field(default=0, init=False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> SystemdNotifier:
        """
        Build a notifier from an environment such as C{os.environ}.
        """
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        """
        Tell the service manager that the daemon is listening.
        """
        self.notify(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def stopping(self) -> None:
        """
        Tell the service manager that the daemon has begun to shut down.
        """
        self.notify(STOPPING="1", STATUS="stopping")

    def notify(self, **fields: str) -> None:
        """
        Send one message with these fields.

        A value loses its line breaks, because each line is one field. A failed
        send (an OSError) is logged, not raised, so the daemon keeps running
        without its service manager.
        """
        if self.address is None:
            return
        address = _socket_address(self.address)
        if address is None:
            self._log_failure(f"unsupported socket address {self.address!r}")
            return

        lines = [
            f"{name}={' '.join(value.splitlines())}" for name, value in fields.items()
        ]
        message = "\n".join(lines).encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                # A full receive queue must not block the reactor; the
                # message is dropped instead.
                self._socket.setblocking(False)
            self._socket.sendto(message, address)
        except OSError as error:
            self._log_failure(str(error))
            return
        if self._failures:
            log.info(
                "Notifications reach {address} again after {count} failed sends",
                address=self.address,
                count=self._failures,
            )
            self._failures = 0

    def _log_failure(self, error: str) -> None:
        # Only the first failure in a row is logged, so that a service manager
        # that went away does not fill the log with one line per phase.
        if self._failures == 0:
            log.warn(
                "Sending a notification to {address} failed: {error}",
                address=self.address,
                error=error,
            )
        self._failures += 1

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
