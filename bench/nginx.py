"""
Debian's nginx as the reference streaming reverse proxy.

The benchmark starts its own nginx with a configuration and prefix in a temporary
directory, in the foreground (`daemon off`), and never touches the system's nginx
configuration or service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_CONFIG = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream ollama {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{listen_port};
        client_max_body_size 0;

        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $proxy_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """
    Return the path of the nginx binary, or None when it is not installed.
    """
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        # /usr/sbin is not on the PATH of every user.
        found = "/usr/sbin/nginx"
    return found


def install_nginx() -> str:
    """
    Install Debian's nginx-light, or nginx where nginx-light is not available, and
    return the binary's path.

    Raises:
        RuntimeError: the process is not root, or apt-get failed.
    """
    if os.geteuid() != 0:
        raise RuntimeError(
            "nginx is not installed and installing it needs root; run "
            "`apt-get install nginx-light`, or leave nginx out with "
            "--configs direct,exoproxy"
        )
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=environment)
    for package in ("nginx-light", "nginx"):
        installed = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            check=False,
            env=environment,
        )
        if installed.returncode == 0 and find_nginx():
            return find_nginx()
    raise RuntimeError("apt-get could not install nginx-light or nginx")


def nginx_version(binary: str) -> str:
    """
    Return the version that `nginx -v` prints, such as "nginx/1.22.1".
    """
    output = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    text = (output.stderr or output.stdout).strip()
    return text.removeprefix("nginx version: ")


def write_config(prefix: Path, listen_port: int, upstream_port: int) -> Path:
    """
    Write the configuration of an nginx that listens on 127.0.0.1:`listen_port` and
    proxies to 127.0.0.1:`upstream_port`, and return its path.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    # The worker runs as the user `nobody` when nginx starts as root, and it must
    # reach the temporary paths inside the prefix.
    prefix.chmod(0o755)
    config = prefix / "nginx.conf"
    config.write_text(
        _CONFIG.format(
            prefix=prefix, listen_port=listen_port, upstream_port=upstream_port
        )
    )
    return config


def nginx_command(binary: str, prefix: Path, config: Path) -> list[str]:
    """
    Return the command that runs nginx in the foreground with this configuration.
    """
    return [
        binary,
        "-p",
        f"{prefix}/",
        "-c",
        str(config),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    ]
