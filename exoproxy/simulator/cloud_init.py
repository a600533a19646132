"""
Read what a simulated instance boots from its cloud-init user-data.

The simulator does not run cloud-init. It reads two facts from a `#cloud-config`
document and acts them out:

- The Ollama listen port, from the `write_files` entry at `OLLAMA_DROP_IN_PATH`, whose
  content has a line `Environment="OLLAMA_HOST=<host>:<port>"`.
- The models to pull, from `runcmd` items that are lists starting with
  `"ollama", "pull", "<model>"`. Shell-string items are not parsed.
- The TLS terminator in front of Ollama, from the nginx site that `write_files`
  writes (see `exoproxy.simulator.terminator`), when there is one.

The user-data is base64 of the document, or of its gzip, as the `user-data` field of
the Exoscale API carries it.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import re
from dataclasses import dataclass
from typing import Any

import yaml

from exoproxy.simulator.terminator import SimulatedTerminator, find_terminator

OLLAMA_DROP_IN_PATH = "/etc/systemd/system/ollama.service.d/exoproxy.conf"

# Ollama's port when OLLAMA_HOST names a host without one.
OLLAMA_DEFAULT_PORT = 11434

_GZIP_MAGIC = b"\x1f\x8b"

_OLLAMA_HOST_LINE = re.compile(
    r"""^\s*Environment=["']?OLLAMA_HOST=(?P<value>[^"'\s]+)["']?\s*$""", re.MULTILINE
)


class UserDataError(ValueError):
    """
    The user-data is not base64, not gzip where it starts like gzip, or not YAML.
    """


@dataclass(frozen=True)
class SimulatedBoot:
    """
    The Ollama port and models that a simulated instance starts once cloud-init
    is done.

    Attributes:
        port: The TCP port Ollama listens on, 0 for any free port, or None if the
            user-data configures no Ollama, in which case no Ollama comes up.
        models: The models to pull, in `runcmd` order.
        terminator: The TLS listener in front of Ollama, which then listens on
            the instance's loopback only, or None when Ollama itself is public.
    """

    port: int | None
    models: tuple[str, ...]
    terminator: SimulatedTerminator | None = None


def decode_user_data(user_data_b64: str) -> str:
    """
    Decode the base64 user-data, gunzipping it if it starts with the gzip magic.

    Raises:
        UserDataError: The data is not base64, a corrupt gzip, or not UTF-8.
    """
    try:
        raw = base64.b64decode(user_data_b64, validate=True)
    except binascii.Error as error:
        raise UserDataError(f"user-data is not valid base64: {error}") from error

    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise UserDataError(f"user-data is not valid gzip: {error}") from error

    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserDataError(f"user-data is not UTF-8 text: {error}") from error


def parse_user_data(user_data_b64: str | None) -> SimulatedBoot:
    """
    Parse the Ollama port and the models to pull from base64 user-data.

    User-data that is absent, or that is not a `#cloud-config` document (a shell
    script, for example), boots no Ollama.

    Raises:
        UserDataError: The user-data cannot be decoded or its YAML is invalid.
    """
    if not user_data_b64:
        return SimulatedBoot(port=None, models=())

    text = decode_user_data(user_data_b64)
    if not text.startswith("#cloud-config"):
        return SimulatedBoot(port=None, models=())

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserDataError(f"user-data is not valid YAML: {error}") from error
    if not isinstance(document, dict):
        return SimulatedBoot(port=None, models=())

    return SimulatedBoot(
        port=_find_ollama_port(document.get("write_files")),
        models=_find_pulled_models(document.get("runcmd")),
        terminator=_find_terminator(document.get("write_files")),
    )


def _find_terminator(write_files: Any) -> SimulatedTerminator | None:
    if not isinstance(write_files, list):
        return None

    files = {
        str(entry.get("path")): _decode_file_content(entry)
        for entry in write_files
        if isinstance(entry, dict)
    }
    try:
        return find_terminator(files)
    except ValueError as error:
        raise UserDataError(f"user-data has an invalid nginx site: {error}") from None


def _find_ollama_port(write_files: Any) -> int | None:
    if not isinstance(write_files, list):
        return None

    for entry in write_files:
        if not isinstance(entry, dict) or entry.get("path") != OLLAMA_DROP_IN_PATH:
            continue

        content = _decode_file_content(entry)
        match = _OLLAMA_HOST_LINE.search(content)
        if match is not None:
            return _parse_ollama_host_port(match.group("value"))
    return None


def _decode_file_content(entry: dict[str, Any]) -> str:
    """
    Decode a `write_files` content with the encodings that cloud-init accepts.
    """
    content = entry.get("content", "")
    encoding = str(entry.get("encoding", "text/plain")).lower()
    if encoding in ("text/plain", ""):
        return str(content)

    try:
        data = content if isinstance(content, bytes) else str(content).encode()
        if encoding in ("b64", "base64", "gz+b64", "gzip+base64", "gz+base64"):
            data = base64.b64decode(data)
        if encoding.startswith(("gz", "gzip")):
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except (binascii.Error, OSError, EOFError, UnicodeDecodeError) as error:
        raise UserDataError(
            f"write_files content of {entry.get('path')} is not valid {encoding}"
        ) from error


def _parse_ollama_host_port(value: str) -> int:
    """
    Parse the port of an OLLAMA_HOST value such as `0.0.0.0:11434`, `[::]:8080`,
    `http://host:11434` or `host`, the way Ollama defaults a missing port.
    """
    host_port = value.split("://", 1)[-1].split("/", 1)[0]
    if host_port.startswith("["):
        _, _, rest = host_port.partition("]")
        port_text = rest.removeprefix(":")
    elif ":" in host_port:
        port_text = host_port.rsplit(":", 1)[1]
    else:
        port_text = ""

    if not port_text:
        return OLLAMA_DEFAULT_PORT
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise UserDataError(f"OLLAMA_HOST {value!r} has an invalid port")
    return int(port_text)


def _find_pulled_models(runcmd: Any) -> tuple[str, ...]:
    if not isinstance(runcmd, list):
        return ()

    models = []
    for item in runcmd:
        if (
            isinstance(item, list)
            and len(item) >= 3
            and item[0] == "ollama"
            and item[1] == "pull"
        ):
            models.append(str(item[2]))
    return tuple(models)
