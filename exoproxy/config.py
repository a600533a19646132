"""
The daemon's validated configuration, and the checks that build it.

Every check here runs before the daemon starts listening, so a bad value stops it with
one message that names the option, instead of failing on the first request.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import attrs
import exoscale
from twisted.python.url import URL

IDLE_ACTIONS = ("stop", "destroy")
# The actions on an instance that did not become ready, or when the daemon exits.
INSTANCE_ACTIONS = ("stop", "destroy", "keep")

# Families that the earlier proxy named without the API's "gpu" prefix.
_FAMILY_ALIASES = {"a5000": "gpua5000", "a30": "gpua30", "3080ti": "gpu3080ti"}

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


class ConfigError(ValueError):
    """
    A configuration value is missing or invalid.

    The message names the option and how to fix it.
    """


@attrs.frozen
class InstanceType:
    """
    An Exoscale instance type, as the API names it: a family and a size.
    """

    family: str
    size: str

    @property
    def gpu(self) -> bool:
        return self.family.startswith("gpu")

    def __str__(self) -> str:
        return f"{self.family}.{self.size}"


@attrs.frozen
class Config:
    """
    The settings of one exoproxy daemon.

    Durations are in seconds. A timeout of 0 means no timeout. `state_dir` is None
    with --simulate when no directory is given, and the service then keeps the key
    material in a temporary directory. An empty `client_tokens` accepts every
    client.
    """

    listen: tuple[str, ...]
    zone: str
    instance_type: InstanceType
    template: str
    disk_size: int
    idle_timeout: float
    model: str
    instance_name: str
    api_url: str
    api_key: str
    api_secret: str = attrs.field(repr=False)
    api_timeout: float
    api_threads: int
    backend_url: str | None
    backend_port: int
    idle_action: str
    allowed_networks: tuple[str, ...]
    idle_check_interval: float
    ready_timeout: float
    poll_interval: float
    connect_timeout: float
    upstream_idle_timeout: float
    hold_timeout: float
    max_held_requests: int
    local_routes: frozenset[str]
    allowed_origins: tuple[str, ...]
    simulate: bool
    simulate_boot_delay: float
    # The security settings are keyword-only, so they can follow fields with
    # defaults in any order.
    state_dir: str | None = attrs.field(default=None, kw_only=True)
    client_tokens: tuple[str, ...] = attrs.field(default=(), kw_only=True, repr=False)
    ssh_networks: tuple[str, ...] = attrs.field(default=(), kw_only=True)
    ssh_key: str | None = attrs.field(default=None, kw_only=True)
    # The fault handling settings. They set the actions on an instance that did not
    # become ready and at exit, the cost guard (0 is off), the retries of API calls
    # and of provisioning runs, and the bounds of stops and of the shutdown.
    on_ready_timeout: str = attrs.field(default="stop", kw_only=True)
    on_exit: str = attrs.field(default="stop", kw_only=True)
    max_instance_hours: float = attrs.field(default=0.0, kw_only=True)
    api_retries: int = attrs.field(default=5, kw_only=True)
    api_retry_delay: float = attrs.field(default=1.0, kw_only=True)
    api_retry_max_delay: float = attrs.field(default=30.0, kw_only=True)
    run_retry_delay: float = attrs.field(default=10.0, kw_only=True)
    run_retry_max_delay: float = attrs.field(default=600.0, kw_only=True)
    stop_timeout: float = attrs.field(default=600.0, kw_only=True)
    shutdown_timeout: float = attrs.field(default=60.0, kw_only=True)
    client_timeout: float = attrs.field(default=60.0, kw_only=True)

    @property
    def fixed_backend(self) -> bool:
        """
        Whether the daemon proxies to a fixed backend and makes no cloud calls.
        """
        return self.backend_url is not None


def _spec_enum(schema_name: str, field_name: str) -> tuple[str, ...]:
    spec_path = Path(exoscale.__file__).parent / "openapi.json"
    spec = json.loads(spec_path.read_text())
    schema = spec["components"]["schemas"][schema_name]
    return tuple(schema["properties"][field_name]["enum"])


def known_zones() -> tuple[str, ...]:
    """
    Return the zone names that the installed Exoscale SDK's API description lists.
    """
    spec_path = Path(exoscale.__file__).parent / "openapi.json"
    spec = json.loads(spec_path.read_text())
    return tuple(spec["servers"][0]["variables"]["zone"]["enum"])


def public_api_url(zone: str) -> str:
    """
    Return the public Exoscale API endpoint of a zone.
    """
    return f"https://api-{zone}.exoscale.com/v2"


def parse_zone(value: str) -> str:
    zones = known_zones()
    if value not in zones:
        raise ConfigError(
            f"--zone: unknown zone {value!r}; use one of {', '.join(zones)}"
        )
    return value


def parse_instance_type(value: str) -> InstanceType:
    """
    Parse FAMILY.SIZE, such as "gpua5000.small" or its short form "a5000.small".

    Raises:
        ConfigError: the family or the size is not one the API defines.
    """
    family, dot, size = value.strip().lower().partition(".")
    if not dot:
        raise ConfigError(
            f"--instance-type: invalid value {value!r}; use FAMILY.SIZE, "
            "for example a5000.small or standard.medium"
        )

    family = _FAMILY_ALIASES.get(family, family)
    families = _spec_enum("instance-type", "family")
    if family not in families:
        raise ConfigError(
            f"--instance-type: unknown family in {value!r}; "
            f"use one of {', '.join(families)}"
        )

    sizes = _spec_enum("instance-type", "size")
    if size not in sizes:
        raise ConfigError(
            f"--instance-type: unknown size in {value!r}; use one of {', '.join(sizes)}"
        )
    return InstanceType(family=family, size=size)


def parse_number(option: str, value: str, *, minimum: float = 0) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"--{option}: invalid number {value!r}") from None
    if not number >= minimum or number == float("inf"):
        raise ConfigError(f"--{option}: {value!r} must be at least {minimum:g}")
    return number


def parse_integer(option: str, value: str, *, minimum: int, maximum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"--{option}: invalid whole number {value!r}") from None
    if not minimum <= number <= maximum:
        raise ConfigError(
            f"--{option}: {number} is out of range; use {minimum} to {maximum}"
        )
    return number


def parse_http_url(option: str, value: str) -> str:
    """
    Check that a URL is absolute http(s) with a host, and return it without a
    trailing slash.
    """
    try:
        url = URL.from_text(value)
    except Exception:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"--{option}: invalid URL {value!r}; use http://HOST:PORT or https://..."
        )
    return value.rstrip("/")


def parse_model(value: str) -> str:
    if not _MODEL_NAME.match(value):
        raise ConfigError(
            f"--model: invalid model name {value!r}; use a name such as "
            "granite3.1-dense:8b"
        )
    return value


def parse_idle_action(value: str) -> str:
    if value not in IDLE_ACTIONS:
        raise ConfigError(
            f"--idle-action: invalid value {value!r}; use one of "
            f"{', '.join(IDLE_ACTIONS)}"
        )
    return value


def parse_instance_action(option: str, value: str) -> str:
    if value not in INSTANCE_ACTIONS:
        raise ConfigError(
            f"--{option}: invalid value {value!r}; use one of "
            f"{', '.join(INSTANCE_ACTIONS)}"
        )
    return value


def parse_networks(values: list[str], option: str = "allow-cidr") -> tuple[str, ...]:
    """
    Parse the networks that may reach a port of the instance, in CIDR notation. A
    bare address is its own /32 or /128 network.

    Raises:
        ConfigError: a value is not a network, or has host bits set, such as
            203.0.113.7/24. That is rejected rather than widened to
            203.0.113.0/24, because it opens a port to more addresses than the
            one written, so it is more likely a mistyped /32 than a network.
    """
    networks = []
    for value in values:
        text = value.strip()
        try:
            networks.append(str(ipaddress.ip_network(text)))
            continue
        except ValueError:
            pass
        try:
            widened = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(
                f"--{option}: invalid network {value!r}; use CIDR notation such "
                "as 203.0.113.7/32"
            ) from None
        address = ipaddress.ip_interface(text).ip
        raise ConfigError(
            f"--{option}: invalid network {value!r}: it has host bits set; use "
            f"{widened} for the whole network, or {address}/{address.max_prefixlen} "
            "for the one address"
        )
    return tuple(networks)


def read_secret_file(path: str) -> str:
    """
    Read an API secret from a file, without its trailing newline.

    Raises:
        ConfigError: the file cannot be read or is empty. The message names the
            path but never the file's content.
    """
    try:
        secret = Path(path).read_text().strip()
    except OSError as error:
        raise ConfigError(
            f"--api-secret-file: cannot read {path!r}: {error.strerror}"
        ) from None
    if not secret:
        raise ConfigError(f"--api-secret-file: {path!r} is empty")
    return secret
