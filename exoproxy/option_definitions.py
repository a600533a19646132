"""
The value options of `twistd exoproxy`: each one's name, environment variable,
default and help text.
"""

from __future__ import annotations

from exoproxy.routes import DEFAULT_LOCAL_ROUTES

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
