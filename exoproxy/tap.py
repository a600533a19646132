"""
The `twistd exoproxy` command line: its options and the service they build.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.application.service import IService
from twisted.python import usage

from exoproxy.config import ConfigError
from exoproxy.logs import observer_for_format, parse_log_format
from exoproxy.option_definitions import _PARAMETERS
from exoproxy.option_values import build_config


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
