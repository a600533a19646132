"""
Validate parsed `twistd exoproxy` options, and the environment variables and systemd
credentials that they fall back on, into a L{Config}.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from exoproxy import auth
from exoproxy import config as _config
from exoproxy.backend_tls import default_state_dir
from exoproxy.config import Config, ConfigError
from exoproxy.cors import parse_origins
from exoproxy.routes import parse_local_routes

if TYPE_CHECKING:
    from exoproxy.tap import Options


def _listen_endpoints(options: Options, environ: Mapping[str, str]) -> tuple[str, ...]:
    if options["listen"]:
        return tuple(options["listen"])
    from_environment = environ.get("EXOPROXY_LISTEN", "").split()
    return tuple(from_environment) or ("tcp:11434",)


def _allowed_networks(
    options: Options, environ: Mapping[str, str], needed: bool
) -> tuple[str, ...]:
    values = options["allow-cidr"] or environ.get("EXOPROXY_ALLOW_CIDR", "").split()
    if options["simulate"] and not values:
        values = ["127.0.0.0/8"]
    networks = _config.parse_networks(values)
    if needed and not networks:
        raise ConfigError(
            "--allow-cidr: missing; give the networks that may reach Ollama on the "
            "instance, such as this host's public address: --allow-cidr "
            "203.0.113.7/32 (0.0.0.0/0 opens it to everyone)"
        )
    return networks


def _ssh_networks(options: Options, environ: Mapping[str, str]) -> tuple[str, ...]:
    values = (
        options["allow-ssh-cidr"] or environ.get("EXOPROXY_ALLOW_SSH_CIDR", "").split()
    )
    return _config.parse_networks(values, option="allow-ssh-cidr")


def _client_tokens(options: Options, environ: Mapping[str, str]) -> tuple[str, ...]:
    if options["api-key-file"]:
        return auth.read_tokens(options["api-key-file"])
    from_credential = _read_credential(environ, auth.CREDENTIAL_NAME)
    if from_credential is not None:
        return auth.parse_tokens(from_credential, f"credential {auth.CREDENTIAL_NAME}")
    from_environment = environ.get("EXOPROXY_API_KEYS", "")
    if from_environment.strip():
        return auth.parse_tokens(
            "\n".join(from_environment.split()), "EXOPROXY_API_KEYS"
        )
    return ()


def _state_dir(options: Options, environ: Mapping[str, str]) -> str | None:
    if options["state-dir"]:
        return options["state-dir"]
    if options["simulate"]:
        return None
    return str(default_state_dir(environ))


def _backend_port(options: Options) -> int:
    default = "11435" if options["simulate"] else "11443"
    port = _config.parse_integer(
        "backend-port", options["backend-port"] or default, minimum=1, maximum=65535
    )
    if port == 11434 and not options["simulate"] and not options["backend-url"]:
        raise ConfigError(
            "--backend-port: 11434 is where Ollama listens on the instance, behind "
            "the TLS terminator; use another port, such as the default 11443"
        )
    return port


def _origins(options: Options, environ: Mapping[str, str]) -> tuple[str, ...]:
    if options["allow-origin"]:
        return parse_origins(options["allow-origin"])
    from_environment = environ.get("OLLAMA_ORIGINS", "").split(",")
    return parse_origins(
        (origin.strip() for origin in from_environment if origin.strip()),
        source="OLLAMA_ORIGINS",
    )


def _local_routes(value: str) -> frozenset[str]:
    try:
        return parse_local_routes(value)
    except ValueError as error:
        raise ConfigError(f"--local-routes: {error}") from None


def _credentials(options: Options, environ: Mapping[str, str]) -> tuple[str, str]:
    if options["simulate"]:
        # The simulated cloud accepts exactly this pair, which lives only in memory.
        return "EXOsimulated", secrets.token_urlsafe(32)

    key = options["api-key"] or _read_credential(environ, "exoscale-api-key") or ""
    if options["api-secret-file"]:
        secret = _config.read_secret_file(options["api-secret-file"])
    else:
        secret = environ.get("EXOSCALE_API_SECRET", "") or (
            _read_credential(environ, "exoscale-api-secret") or ""
        )

    if not key:
        raise ConfigError(
            "--api-key: missing Exoscale API key; set EXOSCALE_API_KEY or the "
            "systemd credential exoscale-api-key, or use --simulate to try "
            "exoproxy without an account"
        )
    if not secret:
        raise ConfigError(
            "missing Exoscale API secret; set EXOSCALE_API_SECRET, "
            "--api-secret-file or the systemd credential exoscale-api-secret, or "
            "use --simulate"
        )
    return key, secret


def _read_credential(environ: Mapping[str, str], name: str) -> str | None:
    """
    Return a systemd credential (LoadCredential=NAME:PATH) without its trailing
    newline, or None when the daemon has no credential of that name.

    Raises:
        ConfigError: the credential exists but cannot be read or is empty. The
            message names the file but never its content.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    if not path.exists():
        return None
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise ConfigError(
            f"credential {name}: cannot read {str(path)!r}: {error.strerror}"
        ) from None
    if not value:
        raise ConfigError(f"credential {name}: {str(path)!r} is empty")
    return value


def build_config(options: Options, environ: Mapping[str, str]) -> Config:
    """
    Validate parsed options into a L{Config}.

    Raises:
        ConfigError: a value is missing or invalid.
    """
    backend_url = None
    if options["backend-url"]:
        backend_url = _config.parse_http_url("backend-url", options["backend-url"])
        if options["simulate"]:
            raise ConfigError("--backend-url and --simulate cannot be used together")

    zone = _config.parse_zone(options["zone"])
    if backend_url is None:
        api_key, api_secret = _credentials(options, environ)
    else:
        api_key, api_secret = "", ""

    # With --simulate, the service sets the URL once the simulator listens.
    api_url = "" if options["simulate"] else _config.public_api_url(zone)
    if options["exoscale-api-url"]:
        api_url = _config.parse_http_url(
            "exoscale-api-url", options["exoscale-api-url"]
        )

    return Config(
        listen=_listen_endpoints(options, environ),
        zone=zone,
        instance_type=_config.parse_instance_type(options["instance-type"]),
        template=options["template"],
        disk_size=_config.parse_integer(
            "disk-size", options["disk-size"], minimum=10, maximum=51200
        ),
        idle_timeout=_config.parse_number(
            "idle-timeout", options["idle-timeout"], minimum=1
        ),
        model=_config.parse_model(options["model"]),
        instance_name=options["instance-name"],
        api_url=api_url,
        api_key=api_key,
        api_secret=api_secret,
        api_timeout=_config.parse_number(
            "api-timeout", options["api-timeout"], minimum=0.1
        ),
        api_threads=_config.parse_integer(
            "api-threads", options["api-threads"], minimum=1, maximum=64
        ),
        backend_url=backend_url,
        backend_port=_backend_port(options),
        idle_action=_config.parse_idle_action(options["idle-action"]),
        allowed_networks=_allowed_networks(
            options, environ, needed=backend_url is None
        ),
        idle_check_interval=_config.parse_number(
            "idle-check-interval", options["idle-check-interval"], minimum=0.01
        ),
        ready_timeout=_config.parse_number(
            "ready-timeout", options["ready-timeout"], minimum=1
        ),
        poll_interval=_config.parse_number(
            "poll-interval", options["poll-interval"], minimum=0.01
        ),
        connect_timeout=_config.parse_number(
            "connect-timeout", options["connect-timeout"], minimum=0.1
        ),
        upstream_idle_timeout=_config.parse_number(
            "upstream-idle-timeout", options["upstream-idle-timeout"]
        ),
        hold_timeout=_config.parse_number("hold-timeout", options["hold-timeout"]),
        max_held_requests=_config.parse_integer(
            "max-held-requests",
            options["max-held-requests"],
            minimum=0,
            maximum=1_000_000,
        ),
        local_routes=_local_routes(options["local-routes"]),
        allowed_origins=_origins(options, environ),
        simulate=bool(options["simulate"]),
        simulate_boot_delay=_config.parse_number(
            "simulate-boot-delay", options["simulate-boot-delay"]
        ),
        state_dir=None if backend_url else _state_dir(options, environ),
        client_tokens=_client_tokens(options, environ),
        ssh_networks=_ssh_networks(options, environ),
        ssh_key=options["ssh-key"] or None,
        **_fault_handling(options),
    )


def _fault_handling(options: Options) -> dict[str, object]:
    """
    Validate the options of the fault handling, as keyword arguments of L{Config}.
    """
    number = _config.parse_number
    return {
        "on_ready_timeout": _config.parse_instance_action(
            "on-ready-timeout", options["on-ready-timeout"]
        ),
        "on_exit": _config.parse_instance_action("on-exit", options["on-exit"]),
        "max_instance_hours": number(
            "max-instance-hours", options["max-instance-hours"]
        ),
        "api_retries": _config.parse_integer(
            "api-retries", options["api-retries"], minimum=1, maximum=100
        ),
        "api_retry_delay": number(
            "api-retry-delay", options["api-retry-delay"], minimum=0.001
        ),
        "api_retry_max_delay": number(
            "api-retry-max-delay", options["api-retry-max-delay"], minimum=0.001
        ),
        "run_retry_delay": number(
            "run-retry-delay", options["run-retry-delay"], minimum=0.001
        ),
        "run_retry_max_delay": number(
            "run-retry-max-delay", options["run-retry-max-delay"], minimum=0.001
        ),
        "stop_timeout": number("stop-timeout", options["stop-timeout"], minimum=1),
        "shutdown_timeout": number(
            "shutdown-timeout", options["shutdown-timeout"], minimum=0.1
        ),
        "client_timeout": number(
            "client-timeout", options["client-timeout"], minimum=0.1
        ),
    }
