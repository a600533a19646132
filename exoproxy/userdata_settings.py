"""
The settings of the user-data, validated when they are created, because the rendered
document writes their values into shell commands, a systemd unit and an nginx
configuration.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import attrs

# RFC 6750's b64token characters, without the ones that nginx would read as a
# variable or a quote. The secret is written into an nginx string.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")

# A model reference such as "llama3.2:1b" or "hf.co/org/repo:Q4_K_M". The first
# character is alphanumeric so that `ollama pull` never reads the name as an option.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]*")

_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _to_model_tuple(models: Iterable[str]) -> tuple[str, ...]:
    # A bare string is iterable, and would become one model per character.
    if isinstance(models, str):
        raise TypeError(f"Invalid models {models!r}: expected a sequence of names")

    return tuple(models)


def _validate_port(instance: UserDataSettings, attribute: Any, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"Invalid {attribute.name} {port!r}: expected an int")

    if not 1 <= port <= 65535:
        raise ValueError(
            f"Invalid {attribute.name} {port!r}: expected a port in 1..65535"
        )


def _validate_models(
    instance: UserDataSettings, attribute: Any, models: tuple[str, ...]
) -> None:
    for model in models:
        if not isinstance(model, str):
            raise TypeError(f"Invalid model name {model!r}: expected a str")

        if not model:
            raise ValueError("Invalid model name '': a model name must not be empty")

        if _MODEL_NAME.fullmatch(model) is None:
            raise ValueError(
                f"Invalid model name {model!r}: use only letters, digits and"
                " . _ : / @ - (no whitespace or shell metacharacters), starting with a"
                " letter or digit"
            )


def _validate_host(instance: UserDataSettings, attribute: Any, host: str) -> None:
    if not isinstance(host, str):
        raise TypeError(f"Invalid {attribute.name} {host!r}: expected a str")

    # systemd expands "%" in unit files, so an IPv6 zone index such as "%eth0" is
    # rejected.
    if "%" in host:
        raise ValueError(
            f"Invalid {attribute.name} {host!r}: an IPv6 zone index is not supported"
        )

    try:
        ipaddress.ip_address(host)
    except ValueError:
        if _HOSTNAME.fullmatch(host) is None:
            raise ValueError(
                f"Invalid {attribute.name} {host!r}: expected an IP address or a"
                " hostname"
            ) from None


def _validate_pem(label: str) -> Any:
    def validate(instance: Any, attribute: Any, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Invalid {attribute.name}: expected a str")
        if f"-----BEGIN {label}" not in value:
            # The value is never shown, because it may be a private key.
            raise ValueError(f"Invalid {attribute.name}: expected a PEM {label}")

    return validate


def _validate_bearer_token(instance: Any, attribute: Any, token: str) -> None:
    if not isinstance(token, str):
        raise TypeError(f"Invalid {attribute.name}: expected a str")
    if _BEARER_TOKEN.fullmatch(token) is None:
        # The value is never shown, because it is a secret.
        raise ValueError(
            f"Invalid {attribute.name}: use at least 16 letters, digits or"
            " . _ ~ + / = -"
        )


def _validate_server_name(instance: Any, attribute: Any, name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"Invalid {attribute.name} {name!r}: expected a str")
    if _HOSTNAME.fullmatch(name) is None:
        raise ValueError(f"Invalid {attribute.name} {name!r}: expected a DNS name")


@attrs.frozen(kw_only=True)
class TerminatorSettings:
    """
    The TLS terminator (nginx) that fronts Ollama on the instance.

    Attributes:
        port: The public TCP port that nginx listens on with TLS, in 1..65535.
        certificate_pem: The server certificate that nginx presents, in PEM.
        private_key_pem: The certificate's private key, in PEM. It is written with
            mode 0600.
        bearer_token: The secret that each request must send as
            ``Authorization: Bearer TOKEN``. nginx rejects any other request with 401.
        server_name: The DNS name in the certificate's subjectAltName.
    """

    port: int = attrs.field(validator=_validate_port)
    server_name: str = attrs.field(validator=_validate_server_name)
    certificate_pem: str = attrs.field(validator=_validate_pem("CERTIFICATE"))
    private_key_pem: str = attrs.field(
        repr=False, validator=_validate_pem("PRIVATE KEY")
    )
    bearer_token: str = attrs.field(repr=False, validator=_validate_bearer_token)


def _validate_terminator(
    instance: UserDataSettings, attribute: Any, terminator: TerminatorSettings | None
) -> None:
    if terminator is None:
        return
    if not isinstance(terminator, TerminatorSettings):
        raise TypeError(
            f"Invalid {attribute.name} {terminator!r}: expected TerminatorSettings"
        )

    try:
        loopback = ipaddress.ip_address(instance.ollama_host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"Invalid ollama_host {instance.ollama_host!r}: behind a TLS terminator,"
            " Ollama must listen on a loopback address such as 127.0.0.1"
        )

    # nginx binds the port on every address, which includes Ollama's.
    if terminator.port == instance.ollama_port:
        raise ValueError(
            f"Invalid terminator port {terminator.port}: Ollama already listens on"
            " it; use another port"
        )


@attrs.frozen(kw_only=True)
class UserDataSettings:
    """
    Settings for one Ollama instance's user-data.

    All fields are keyword-only, so that new fields can be added without breaking
    callers. Invalid values raise `ValueError` (or `TypeError` for a wrong type) when
    the settings are created.

    Attributes:
        ollama_port: TCP port that Ollama listens on, in 1..65535.
        models: Ollama model names to pull once Ollama responds, in order. Each name
            contains only letters, digits and ``. _ : / @ -``.
        gpu: Whether to install the NVIDIA driver. Set it for GPU instance families.
        ollama_host: IP address or hostname that Ollama binds to. It must be a
            loopback address when `terminator` is set.
        terminator: The TLS terminator in front of Ollama, or None to expose
            Ollama itself at `ollama_host`.
    """

    ollama_port: int = attrs.field(default=11434, validator=_validate_port)
    models: tuple[str, ...] = attrs.field(
        converter=_to_model_tuple, validator=_validate_models
    )
    gpu: bool = attrs.field(validator=attrs.validators.instance_of(bool))
    ollama_host: str = attrs.field(default="0.0.0.0", validator=_validate_host)
    terminator: TerminatorSettings | None = attrs.field(
        default=None, validator=_validate_terminator
    )
