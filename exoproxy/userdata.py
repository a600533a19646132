"""
Render the cloud-init user-data that turns a fresh Exoscale instance into an Ollama
server.

The target template is "Linux Ubuntu 24.04 LTS 64-bit". The document installs the
NVIDIA driver on GPU instances, installs Ollama with its official install script,
points Ollama at the configured address with a systemd drop-in, waits until Ollama
responds, and pulls the configured models. With `TerminatorSettings`, Ollama listens
on loopback only and nginx from Ubuntu's archive is the one public listener: it
terminates TLS with the given certificate, rejects requests without the bearer
secret, and proxies the rest to Ollama without buffering. This module only renders
the text, which runs on the instance, and downloads nothing itself.

The user-data, and so the private key and the secret in it, can be read back by
anyone who has the account's API key, and by any process on the instance through the
metadata service.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
from typing import Any

import yaml

from exoproxy.userdata_settings import TerminatorSettings, UserDataSettings

#: Maximum length of the base64 ``user-data`` field of ``POST /instance``, from the
#: OpenAPI description bundled with the exoscale SDK 0.16.4.
MAX_USER_DATA_LENGTH = 32768

#: Path of the systemd drop-in that sets Ollama's listening address.
OLLAMA_DROP_IN_PATH = "/etc/systemd/system/ollama.service.d/exoproxy.conf"

OLLAMA_INSTALL_SCRIPT_URL = "https://ollama.com/install.sh"

#: Paths of the TLS terminator's files on the instance.
TLS_CERTIFICATE_PATH = "/etc/exoproxy/tls/backend.crt"
TLS_PRIVATE_KEY_PATH = "/etc/exoproxy/tls/backend.key"
NGINX_SITE_PATH = "/etc/nginx/conf.d/exoproxy.conf"
NGINX_BEARER_PATH = "/etc/nginx/exoproxy-bearer.conf"

# Ubuntu's nginx package enables a default site on port 80.
_NGINX_DEFAULT_SITE_PATH = "/etc/nginx/sites-enabled/default"

# How long nginx waits for Ollama to send the next bytes, and for exoproxy to send or
# take them. A model load or a long response without streaming sends nothing for
# minutes, and exoproxy has its own idle timeout (--upstream-idle-timeout).
_NGINX_TIMEOUT = "3600s"

_OLLAMA_INSTALL_SCRIPT_PATH = "/root/ollama-install.sh"
_NVIDIA_SETUP_PATH = "/usr/local/sbin/exoproxy-nvidia-setup"
_NVIDIA_MODULES_LOAD_PATH = "/etc/modules-load.d/exoproxy-nvidia.conf"

# Ollama responds within seconds of starting. The wait makes 120 requests 1 second
# apart, each limited to 2 seconds, so it gives up after 2 to 6 minutes.
_READY_ATTEMPTS = 120

# Ubuntu's `ubuntu-drivers install --gpgpu` installs the kernel modules and the
# nvidia-headless-no-dkms-<branch> libraries, but not nvidia-smi. Ollama's install
# script checks for nvidia-smi and installs NVIDIA's CUDA repository driver when it is
# missing, so this script installs nvidia-utils-<branch> too.
# NOTE: the tests check this script with `sh -n` only. It has not run on an Exoscale
# GPU instance, and its package names come from ubuntu-drivers-common's source and
# the Ubuntu 24.04 package lists.
_NVIDIA_SETUP_SCRIPT = """\
#!/bin/sh
# Install the NVIDIA server driver that ubuntu-drivers selects for this GPU, the
# nvidia-smi of the same branch, and load the kernel modules that Ollama uses.
set -eu
export DEBIAN_FRONTEND=noninteractive

ubuntu-drivers install --gpgpu

branch=$(dpkg-query -W -f '${db:Status-Abbrev} ${Package}\\n' \\
    'nvidia-headless-no-dkms-*' 2>/dev/null \\
    | awk '$1 == "ii" { sub("^nvidia-headless-no-dkms-", "", $2); print $2; exit }')
if [ -z "$branch" ]; then
    echo "exoproxy: ubuntu-drivers installed no nvidia-headless-no-dkms package" >&2
    exit 1
fi

# The utilities package has no -open variant.
apt-get install -y --no-install-recommends "nvidia-utils-${branch%-open}"

# The linux-modules-nvidia metapackage follows the newest kernel in the archive,
# which can be newer than the running kernel until the next reboot.
# NOTE: the fallback fails when the archive no longer has modules for the running
# kernel, and then only a reboot into the newer kernel loads the driver.
if ! modprobe nvidia; then
    apt-get install -y --no-install-recommends \\
        "linux-modules-nvidia-${branch}-$(uname -r)"
    modprobe nvidia
fi
modprobe nvidia_uvm
nvidia-smi
"""


def _format_host(host: str) -> str:
    # IPv6 literals need brackets before a ":port" suffix.
    if ":" in host:
        return f"[{host}]"

    return host


def _local_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host

    # A wildcard bind address is reachable through loopback on the instance itself.
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "::1"

    return host


def _drop_in(settings: UserDataSettings) -> str:
    address = f"{_format_host(settings.ollama_host)}:{settings.ollama_port}"
    return f'[Service]\nEnvironment="OLLAMA_HOST={address}"\n'


def _wait_for_ollama(local_address: str) -> str:
    url = f"http://{local_address}/"
    return (
        "attempt=0; "
        f"until curl -fsS --max-time 2 -o /dev/null {url}; do "
        "attempt=$((attempt + 1)); "
        f'if [ "$attempt" -ge {_READY_ATTEMPTS} ]; then '
        f'echo "exoproxy: Ollama did not respond at {url}" >&2; exit 1; fi; '
        "sleep 1; "
        "done"
    )


def _nginx_site(settings: UserDataSettings, terminator: TerminatorSettings) -> str:
    ollama = f"{_format_host(settings.ollama_host)}:{settings.ollama_port}"
    return f"""\
# The TLS terminator of exoproxy: the only public listener, in front of Ollama.
upstream exoproxy_ollama {{
    server {ollama};
    keepalive 8;
}}

server {{
    listen {terminator.port} ssl;
    server_name {terminator.server_name};

    ssl_certificate {TLS_CERTIFICATE_PATH};
    ssl_certificate_key {TLS_PRIVATE_KEY_PATH};
    ssl_protocols TLSv1.2 TLSv1.3;

    # Blob uploads stream through at any size.
    client_max_body_size 0;
    client_body_timeout {_NGINX_TIMEOUT};
    send_timeout {_NGINX_TIMEOUT};

    include {NGINX_BEARER_PATH};

    location / {{
        proxy_pass http://exoproxy_ollama;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # Ollama rejects a Host that is not local, such as the upstream name, with 403.
        proxy_set_header Host {ollama};
        proxy_set_header Authorization "";
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout {_NGINX_TIMEOUT};
        proxy_send_timeout {_NGINX_TIMEOUT};
    }}
}}
"""


def _nginx_bearer_check(terminator: TerminatorSettings) -> str:
    # An `if` whose only directive is `return` is safe in nginx's server context.
    return (
        f'if ($http_authorization != "Bearer {terminator.bearer_token}") {{\n'
        "    return 401;\n"
        "}\n"
    )


def _terminator_files(
    settings: UserDataSettings, terminator: TerminatorSettings
) -> list[dict[str, Any]]:
    return [
        {
            "path": TLS_CERTIFICATE_PATH,
            "owner": "root:root",
            "permissions": "0644",
            "content": terminator.certificate_pem,
        },
        {
            "path": TLS_PRIVATE_KEY_PATH,
            "owner": "root:root",
            "permissions": "0600",
            "content": terminator.private_key_pem,
        },
        {
            "path": NGINX_BEARER_PATH,
            "owner": "root:root",
            "permissions": "0600",
            "content": _nginx_bearer_check(terminator),
        },
        {
            "path": NGINX_SITE_PATH,
            "owner": "root:root",
            "permissions": "0644",
            "content": _nginx_site(settings, terminator),
        },
    ]


def _write_files(settings: UserDataSettings) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = [
        {
            "path": OLLAMA_DROP_IN_PATH,
            "owner": "root:root",
            "permissions": "0644",
            "content": _drop_in(settings),
        }
    ]

    if settings.terminator is not None:
        files += _terminator_files(settings, settings.terminator)

    if settings.gpu:
        files.append(
            {
                "path": _NVIDIA_SETUP_PATH,
                "owner": "root:root",
                "permissions": "0755",
                "content": _NVIDIA_SETUP_SCRIPT,
            }
        )

        # Loads the modules on later boots, after the instance is stopped and
        # started again. The nvidia_uvm module is not loaded by udev.
        files.append(
            {
                "path": _NVIDIA_MODULES_LOAD_PATH,
                "owner": "root:root",
                "permissions": "0644",
                "content": "nvidia\nnvidia_uvm\n",
            }
        )

    return files


def _runcmd(settings: UserDataSettings) -> list[str | list[str]]:
    local_address = (
        f"{_format_host(_local_host(settings.ollama_host))}:{settings.ollama_port}"
    )

    # cloud-init joins every item into one /bin/sh script, so `set -e` and the
    # exports below apply to all later items, and a failed step skips the rest.
    commands: list[str | list[str]] = [
        "set -e",
        # cloud-init runs the script without HOME, and the ollama CLI panics with
        # "$HOME is not defined" (https://github.com/ollama/ollama/issues/8756).
        "export HOME=/root",
        f"export OLLAMA_HOST={local_address}",
    ]

    # The driver goes first, because Ollama's install script installs another driver
    # when it finds no nvidia-smi.
    if settings.gpu:
        commands.append([_NVIDIA_SETUP_PATH])

    commands += [
        [
            "curl",
            "-fsSL",
            "--retry",
            "5",
            "-o",
            _OLLAMA_INSTALL_SCRIPT_PATH,
            OLLAMA_INSTALL_SCRIPT_URL,
        ],
        ["sh", _OLLAMA_INSTALL_SCRIPT_PATH],
        # The install script only enables and starts the service when
        # `systemctl is-system-running` is "running" or "degraded", and the system is
        # still "starting" while cloud-init's final stage runs.
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "ollama"],
        ["systemctl", "restart", "ollama"],
        _wait_for_ollama(local_address),
    ]

    # nginx starts before the pulls, so that exoproxy can see them progress.
    if settings.terminator is not None:
        commands += [
            ["rm", "-f", _NGINX_DEFAULT_SITE_PATH],
            ["nginx", "-t", "-q"],
            ["systemctl", "enable", "nginx"],
            ["systemctl", "restart", "nginx"],
        ]

    commands += [["ollama", "pull", model] for model in settings.models]
    return commands


class _Dumper(yaml.SafeDumper):
    """A YAML dumper that writes multi-line strings as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render_user_data(settings: UserDataSettings) -> str:
    """
    Render the ``#cloud-config`` document for an Ollama instance.

    The document refreshes the package index but never upgrades packages, because an
    upgrade delays readiness by minutes. On GPU settings it installs the NVIDIA
    driver and loads its modules before Ollama is installed. With a terminator, it
    installs and starts nginx once Ollama responds, before the models are pulled.

    Returns:
        The YAML document, starting with the ``#cloud-config`` line.
    """
    # Recent releases of Ollama's install script download a .tar.zst archive.
    packages = ["curl", "zstd"]
    if settings.gpu:
        packages.append("ubuntu-drivers-common")
    if settings.terminator is not None:
        packages.append("nginx")

    config: dict[str, Any] = {
        "package_update": True,
        "package_upgrade": False,
        "package_reboot_if_required": False,
        "packages": packages,
        "write_files": _write_files(settings),
        "runcmd": _runcmd(settings),
    }

    body = yaml.dump(
        config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096
    )
    return "#cloud-config\n" + body


def encode_user_data(text: str) -> str:
    """
    Encode user-data for the ``user-data`` field of the Exoscale API.

    The document is base64-encoded as it is when that fits `MAX_USER_DATA_LENGTH`.
    Otherwise it is gzip-compressed first, which cloud-init detects and decompresses.

    Returns:
        The base64 text, at most `MAX_USER_DATA_LENGTH` characters long.

    Raises:
        ValueError: If the text is empty, or too long even after gzip.
    """
    if not text:
        raise ValueError("Invalid user data: the document is empty")

    data = text.encode("utf-8")
    encoded = base64.b64encode(data).decode("ascii")
    if len(encoded) <= MAX_USER_DATA_LENGTH:
        return encoded

    # mtime=0 keeps the output identical for identical input.
    compressed = gzip.compress(data, compresslevel=9, mtime=0)
    encoded = base64.b64encode(compressed).decode("ascii")
    if len(encoded) > MAX_USER_DATA_LENGTH:
        raise ValueError(
            f"User data is too large: {len(encoded)} base64 characters after gzip,"
            f" over the Exoscale limit of {MAX_USER_DATA_LENGTH}. Pull fewer models."
        )

    return encoded
