"""
The `twistd exoproxy` command line: its options and the service they build.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from twisted.application.service import IService
from twisted.python import usage

from exoproxy import auth
from exoproxy import config as _config
from exoproxy.backend_tls import default_state_dir
from exoproxy.config import Config, ConfigError
from exoproxy.cors import parse_origins
from exoproxy.logs import observer_for_format, parse_log_format
from exoproxy.routes import DEFAULT_LOCAL_ROUTES, parse_local_routes

# Each option: the long name, the environment variable it also reads, the default and
# the help text. The earlier Flask proxy's variable names are kept, so that its users
# can switch over without changing their environment files.
_PARAMETERS: tuple[tuple[str, str, str | None, str], ...] = (
    ("api-key", "EXOSCALE_API_KEY", None, "Exoscale API key."),
    (
        "api-secret-file",
        "EXOSCALE_API_SECRET_FILE",
        None,
        "Read the Exoscale API secret from this file instead of the "
        "EXOSCALE_API_SECRET environment variable.",
    ),
    (
        "api-key-file",
        "EXOPROXY_API_KEY_FILE",
        None,
        "Accept only clients that send one of the tokens in this file (one per "
        "line; blank lines and # comments are ignored) as Authorization: Bearer "
        "TOKEN, which the ollama clients send from OLLAMA_API_KEY. GET / and "
        "HEAD / stay open. Without it, the systemd credential exoproxy-api-keys or "
        "the "
        "EXOPROXY_API_KEYS variable (tokens separated by spaces) is read; "
        "without any, every client is accepted.",
    ),
    (
        "state-dir",
        "EXOPROXY_STATE_DIR",
        None,
        "Directory that keeps each instance's TLS key and secret, with mode 0700 "
        "[default: $STATE_DIRECTORY, else /var/lib/exoproxy if writable, else "
        "~/.local/state/exoproxy; a temporary directory with --simulate].",
    ),
    (
        "ssh-key",
        "EXOPROXY_SSH_KEY",
        None,
        "Name of an Exoscale SSH key that new instances accept; SSH is reachable "
        "only from the networks of --allow-ssh-cidr.",
    ),
    ("zone", "EXOSCALE_ZONE", "at-vie-2", "Exoscale zone of the GPU instance."),
    (
        "instance-type",
        "EXOSCALE_INSTANCE_TYPE",
        "a5000.small",
        "Instance type as FAMILY.SIZE; a5000 is short for the gpua5000 family.",
    ),
    (
        "template",
        "EXOSCALE_TEMPLATE",
        "Linux Ubuntu 24.04 LTS 64-bit",
        "Name of the public template that the instance boots.",
    ),
    ("disk-size", "EXOSCALE_DISK_SIZE", "50", "Instance disk size, in GiB."),
    (
        "idle-timeout",
        "EXOSCALE_IDLE_TIMEOUT",
        "1800",
        "Seconds without a request in flight before the instance is stopped.",
    ),
    ("model", "OLLAMA_MODEL", "granite3.1-dense:8b", "Model that the instance pulls."),
    (
        "instance-name",
        "EXOPROXY_INSTANCE_NAME",
        "exoproxy",
        "Name and label of the managed instance and of its security group.",
    ),
    (
        "exoscale-api-url",
        "EXOSCALE_API_URL",
        None,
        "Exoscale API endpoint passed to the SDK "
        "[default: https://api-ZONE.exoscale.com/v2].",
    ),
    (
        "api-timeout",
        "EXOPROXY_API_TIMEOUT",
        "30",
        "Seconds that one Exoscale API call may take.",
    ),
    (
        "api-threads",
        "EXOPROXY_API_THREADS",
        "4",
        "Maximum number of threads for Exoscale API calls.",
    ),
    (
        "backend-url",
        "EXOPROXY_BACKEND_URL",
        None,
        "Proxy to this Ollama URL and make no cloud calls, for an Ollama that is "
        "always on.",
    ),
    (
        "backend-port",
        "EXOPROXY_BACKEND_PORT",
        None,
        "TCP port of the TLS terminator in front of Ollama on the instance, "
        "where Ollama itself listens on 127.0.0.1:11434 [default: 11443, or "
        "11435 with --simulate, because the simulated instance shares this host].",
    ),
    (
        "idle-action",
        "EXOPROXY_IDLE_ACTION",
        "stop",
        "What to do with an idle instance: stop (keeps its disk and pulled "
        "model, so it is ready sooner) or destroy.",
    ),
    (
        "idle-check-interval",
        "EXOPROXY_IDLE_CHECK_INTERVAL",
        "10",
        "Seconds between checks of the idle timeout.",
    ),
    (
        "ready-timeout",
        "EXOPROXY_READY_TIMEOUT",
        "1800",
        "Seconds that a cold start, from the first API call to Ollama listing "
        "the model, may take before it is an error.",
    ),
    (
        "poll-interval",
        "EXOPROXY_POLL_INTERVAL",
        "1",
        "Seconds between polls of an API operation or of Ollama's readiness.",
    ),
    (
        "connect-timeout",
        "EXOPROXY_CONNECT_TIMEOUT",
        "10",
        "Seconds to wait for a TCP connection to the backend.",
    ),
    (
        "upstream-idle-timeout",
        "EXOPROXY_UPSTREAM_IDLE_TIMEOUT",
        "0",
        "Seconds that the backend may stay silent during a response before the "
        "client gets 504; 0 turns it off, because a model load can take minutes.",
    ),
    (
        "hold-timeout",
        "EXOPROXY_HOLD_TIMEOUT",
        "0",
        "Seconds that a request arriving during a cold start waits for the "
        "instance before it gets 503; 0 answers 503 at once, as most clients "
        "that do not retry need a value such as 600.",
    ),
    (
        "max-held-requests",
        "EXOPROXY_MAX_HELD_REQUESTS",
        "100",
        "Maximum number of requests that wait for a cold start at once; the "
        "others get 503 at once.",
    ),
    (
        "local-routes",
        "EXOPROXY_LOCAL_ROUTES",
        ",".join(sorted(DEFAULT_LOCAL_ROUTES)),
        "Comma-separated polling routes that are answered from memory while the "
        "instance is not ready and never count as activity; the others wake it.",
    ),
    (
        "log-format",
        "EXOPROXY_LOG_FORMAT",
        "text",
        "Log format: text, twistd's lines for a person, or json, one JSON object "
        "per line on standard output (use it with --nodaemon).",
    ),
    (
        "simulate-boot-delay",
        "EXOPROXY_SIMULATE_BOOT_DELAY",
        "3",
        "With --simulate, seconds that a simulated instance takes to boot.",
    ),
    (
        "on-ready-timeout",
        "EXOPROXY_ON_READY_TIMEOUT",
        "stop",
        "What to do with an instance that did not become ready (the ready "
        "timeout passed, or it went into error or lost its public IP): stop, "
        "destroy, or keep it running for inspection.",
    ),
    (
        "on-exit",
        "EXOPROXY_ON_EXIT",
        "stop",
        "What to do with the instance when the daemon shuts down: stop (the "
        "default, so that no GPU hours are billed while nobody can use them), "
        "destroy, or keep it running.",
    ),
    (
        "max-instance-hours",
        "EXOPROXY_MAX_INSTANCE_HOURS",
        "0",
        "Stop the instance after this many hours of continuous uptime, even "
        "with requests in flight; 0 turns the limit off. The next request "
        "starts it again.",
    ),
    (
        "api-retries",
        "EXOPROXY_API_RETRIES",
        "5",
        "Attempts of an Exoscale API call that fails with 429, 5xx, a timeout "
        "or a connection error, the first attempt included.",
    ),
    (
        "api-retry-delay",
        "EXOPROXY_API_RETRY_DELAY",
        "1",
        "Seconds before the second attempt of an API call; the delay doubles, "
        "with jitter, up to --api-retry-max-delay, and a longer Retry-After "
        "wins.",
    ),
    (
        "api-retry-max-delay",
        "EXOPROXY_API_RETRY_MAX_DELAY",
        "30",
        "Maximum seconds between two attempts of an API call.",
    ),
    (
        "run-retry-delay",
        "EXOPROXY_RUN_RETRY_DELAY",
        "10",
        "Seconds after a failed cold start before a request may start another; "
        "the delay doubles, with jitter, up to --run-retry-max-delay.",
    ),
    (
        "run-retry-max-delay",
        "EXOPROXY_RUN_RETRY_MAX_DELAY",
        "600",
        "Maximum seconds between two failed cold starts.",
    ),
    (
        "stop-timeout",
        "EXOPROXY_STOP_TIMEOUT",
        "600",
        "Seconds that stopping or deleting the instance may take before it is "
        "an error.",
    ),
    (
        "shutdown-timeout",
        "EXOPROXY_SHUTDOWN_TIMEOUT",
        "60",
        "Seconds that the daemon's shutdown waits for requests in flight, for "
        "the --on-exit action and for API calls in flight, each.",
    ),
    (
        "client-timeout",
        "EXOPROXY_CLIENT_TIMEOUT",
        "60",
        "Seconds that a client connection may stay silent while it sends a "
        "request, or between requests, before it is closed.",
    ),
)


class Options(usage.Options):
    """
    Options of `twistd exoproxy`. Each option can also be set through the
    environment variable named in its help text; the command line wins.

    After parsing, `self.config` is the validated L{Config}.
    """

    optFlags = [
        [
            "simulate",
            None,
            "Run against the built-in simulated cloud on loopback, with no account "
            "[env: EXOPROXY_SIMULATE=1].",
        ],
    ]
    optParameters = [
        [name, None, default, f"{doc} [env: {env}]"]
        for name, env, default, doc in _PARAMETERS
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self["listen"] = []
        self["allow-cidr"] = []
        self["allow-ssh-cidr"] = []
        self["allow-origin"] = []
        self.docs["allow-ssh-cidr"] = (
            "Open SSH (TCP port 22) on new instances to this network (CIDR); "
            "repeatable. SSH is closed by default, since exoproxy needs no shell "
            "on the instance [env: EXOPROXY_ALLOW_SSH_CIDR, separated by spaces]."
        )
        self.docs["allow-origin"] = (
            "Also accept browser requests from this origin, such as "
            "https://webui.example.com or http://*.lan:*; repeatable. Ollama's own "
            "default origins (localhost, 127.0.0.1, app:// and others) are always "
            "accepted [env: OLLAMA_ORIGINS, separated by commas]."
        )
        self.docs["allow-cidr"] = (
            "Open the backend port of the instance to this network (CIDR); "
            "repeatable. Required with a real account, so that Ollama is never open "
            "to the whole internet by accident: 0.0.0.0/0 must be given explicitly "
            "[default with --simulate: 127.0.0.0/8] "
            "[env: EXOPROXY_ALLOW_CIDR, separated by spaces]."
        )
        self.docs["listen"] = (
            "Listen on this Twisted endpoint string, such as tcp:11434 or "
            "ssl:11434:privateKey=key.pem:certKey=cert.pem; repeatable "
            "[default: tcp:11434] [env: EXOPROXY_LISTEN, separated by spaces]."
        )
        self["metrics-listen"] = []
        self.docs["metrics-listen"] = (
            "Serve /metrics on this Twisted endpoint string instead of on the main "
            "listeners, which then answer it with 404; repeatable "
            "[env: EXOPROXY_METRICS_LISTEN, separated by spaces]."
        )
        for name, env, _default, _doc in _PARAMETERS:
            if self.environ.get(env):
                self[name] = self.environ[env]
        if self.environ.get("EXOPROXY_SIMULATE", "") in ("1", "true", "yes"):
            self["simulate"] = 1

    def opt_allow_cidr(self, network: str) -> None:
        self["allow-cidr"].append(network)

    def opt_allow_ssh_cidr(self, network: str) -> None:
        self["allow-ssh-cidr"].append(network)

    def opt_allow_origin(self, origin: str) -> None:
        self["allow-origin"].append(origin)

    def opt_listen(self, endpoint: str) -> None:
        self["listen"].append(endpoint)

    def opt_metrics_listen(self, endpoint: str) -> None:
        self["metrics-listen"].append(endpoint)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse the command line, and exit with one line that names the option when a
        value is invalid.

        twistd prints its whole help text before a usage error, which hides the one
        line that matters, so a configuration error exits here instead.
        """
        try:
            super().parseOptions(options)
        except (usage.UsageError, ConfigError) as error:
            raise SystemExit(f"exoproxy: {error}") from None

    def postOptions(self) -> None:
        self.config = build_config(self, self.environ)
        self.log_format = parse_log_format(self["log-format"])
        self.metrics_listen = tuple(
            self["metrics-listen"]
            or self.environ.get("EXOPROXY_METRICS_LISTEN", "").split()
        )


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
        origin.strip() for origin in from_environment if origin.strip()
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


def makeService(options: Options) -> IService:
    """
    Build the daemon's service tree from parsed options.
    """
    from twisted.internet import reactor

    from exoproxy.notify import SystemdNotifier
    from exoproxy.service import ExoproxyService

    config = options.config
    if config.simulate and not config.fixed_backend:
        from exoproxy.preflight import check_simulated_catalog

        try:
            check_simulated_catalog(config)
        except ConfigError as error:
            raise SystemExit(f"exoproxy: {error}") from None
    if not (config.simulate or config.fixed_backend or reactor.running):
        # twistd builds the service before it starts the reactor, so these blocking
        # calls block nothing; a daemon built inside a running reactor skips them.
        from exoproxy.preflight import check_account

        try:
            check_account(config)
        except ConfigError as error:
            raise SystemExit(f"exoproxy: {error}") from None
    return ExoproxyService(
        config,
        reactor=reactor,
        metrics_listen=options.metrics_listen,
        notifier=SystemdNotifier.from_environment(options.environ),
        log_observer=observer_for_format(options.log_format),
    )
