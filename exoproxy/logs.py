"""
The daemon's log output: twistd's text lines, or one flat JSON object per line.

`--log-format json` (or `EXOPROXY_LOG_FORMAT=json`) writes records such as::

    {"time": "2025-05-01T09:30:12.345Z", "level": "info",
     "namespace": "exoproxy.service", "message": "exoproxy listening on ...",
     "address": "IPv4Address(type='TCP', host='127.0.0.1', port=11434)"}

`time` is UTC, `level` is a twisted.logger level name (debug, info, warn, error,
critical), `message` is the formatted text, and every named field of the event
follows. twistd's own `--logger exoproxy.logs.json_observer` writes the same
records, and takes precedence over `--log-format`.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent
from twisted.python.components import Componentized

from exoproxy.config import ConfigError

LOG_FORMATS = ("text", "json")

# The keys that every record has; a field of the same name is written with a
# "field_" prefix instead of replacing one of them.
_RECORD_KEYS = ("time", "level", "namespace", "message")

# Keys of events from the legacy twisted.python.log API (bridged in
# twisted/logger/_legacy.py, Twisted 26.10) that repeat what the record already has.
_LEGACY_KEYS = frozenset(
    {"message", "isError", "system", "time", "format", "why", "failure", "printed"}
)

# A field whose name matches is written as "[redacted]" when its value is text, so
# that a secret passed by mistake as a log field never reaches a log shipper.
_SECRET_FIELD = re.compile(
    r"secret|password|passwd|token|authorization|cookie|credential|api_key",
    re.IGNORECASE,
)
REDACTED = "[redacted]"


def parse_log_format(value: str) -> str:
    """
    Check a `--log-format` value.

    Raises:
        ConfigError: the value is not one of L{LOG_FORMATS}.
    """
    if value not in LOG_FORMATS:
        raise ConfigError(
            f"--log-format: invalid value {value!r}; use one of {', '.join(LOG_FORMATS)}"
        )
    return value


def _timestamp(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_record(event: LogEvent) -> dict[str, Any]:
    """
    Return the flat record of one twisted.logger event.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _timestamp(event.get("log_time", 0.0)),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }

    system = event.get("log_system")
    if system and system != "-":
        record["system"] = system

    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
        if not record["message"]:
            record["message"] = record["error"]

    legacy = "log_legacy" in event or event.get("log_namespace") == "log_legacy"
    for name, value in event.items():
        if name.startswith("log_") or (legacy and name in _LEGACY_KEYS):
            continue
        if isinstance(value, str) and _SECRET_FIELD.search(name):
            value = REDACTED
        key = f"field_{name}" if name in record else name
        record[key] = value
    return record


def format_json_line(event: LogEvent) -> str:
    """
    Format one event as a line of JSON. A value that JSON cannot hold is written
    as its str().
    """
    return json.dumps(json_record(event), default=str, ensure_ascii=False) + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    Return an observer that writes one JSON record per line to C{out}, standard
    output by default.

    It is also the factory for twistd's `--logger exoproxy.logs.json_observer`,
    which calls it without arguments.
    """
    # NOTE: standard output is /dev/null once twistd has daemonized, so JSON
    # records are only seen with --nodaemon, as under systemd or Docker.
    return FileLogObserver(out if out is not None else sys.stdout, format_json_line)


def observer_for_format(log_format: str) -> ILogObserver | None:
    """
    Return the observer for a `--log-format` value, or None for text, which
    keeps twistd's own observer and its `--logfile` and `--syslog` options.
    """
    if log_format == "json":
        return json_observer()
    return None


def give_observer_to_twistd(parent: object, observer: ILogObserver) -> None:
    """
    Make twistd log through C{observer}, when C{parent} is twistd's Application.

    twistd builds the service with the plugin's makeService before it starts
    logging, and then logs through the Application's ILogObserver component when
    `--logger` is not given (AppLogger.start in twisted/application/app.py,
    Twisted 26.10). The Application is the parent that twistd hands to the
    service's setServiceParent, so that is where the component is set. Any other
    parent, such as a test's MultiService, is left alone.
    """
    if isinstance(parent, Componentized):
        parent.setComponent(ILogObserver, observer)
