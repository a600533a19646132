"""
The user-data of an instance behind the TLS terminator: its files, its order, its
limits, the simulator's reading of it, and the nginx site run by a real nginx on
loopback when one is installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from twisted.internet import reactor
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from exoproxy.backend_agent import BackendAgent, BackendTLSPolicy
from exoproxy.backend_tls import SERVICE_NAME, generate_material
from exoproxy.simulator.cloud_init import parse_user_data
from exoproxy.userdata import (
    MAX_USER_DATA_LENGTH,
    NGINX_BEARER_PATH,
    NGINX_SITE_PATH,
    OLLAMA_DROP_IN_PATH,
    TLS_CERTIFICATE_PATH,
    TLS_PRIVATE_KEY_PATH,
    encode_user_data,
    render_user_data,
)
from exoproxy.userdata_settings import TerminatorSettings, UserDataSettings
from tests.daemon import free_port

MATERIAL = generate_material(time.time())


def terminator(port: int = 11443, **overrides: Any) -> TerminatorSettings:
    fields: dict[str, Any] = {
        "port": port,
        "server_name": SERVICE_NAME,
        "certificate_pem": MATERIAL.certificate_pem,
        "private_key_pem": MATERIAL.private_key_pem,
        "bearer_token": MATERIAL.bearer_token,
        **overrides,
    }
    return TerminatorSettings(**fields)


def settings(gpu: bool = True, **overrides: Any) -> UserDataSettings:
    fields: dict[str, Any] = {
        "models": ("granite3.1-dense:8b",),
        "gpu": gpu,
        "ollama_host": "127.0.0.1",
        "terminator": terminator(),
        **overrides,
    }
    return UserDataSettings(**fields)


def files_of(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in document["write_files"]}


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_terminator_schema_valid(gpu: bool, tmp_path: Path):
    if shutil.which("cloud-init") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the cloud-init command is missing")
        pytest.skip("the cloud-init command is missing; apt-get install cloud-init")
    path = tmp_path / "user-data.yaml"
    path.write_text(render_user_data(settings(gpu=gpu)))

    result = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_terminator_user_data_fits_limit():
    encoded = encode_user_data(render_user_data(settings(gpu=True)))

    # Plain base64, without gzip, and with room to spare.
    assert len(encoded) < MAX_USER_DATA_LENGTH // 3


def test_terminator_files_and_modes():
    document = yaml.safe_load(render_user_data(settings()))
    files = files_of(document)

    assert files[TLS_CERTIFICATE_PATH]["content"] == MATERIAL.certificate_pem
    assert files[TLS_PRIVATE_KEY_PATH]["content"] == MATERIAL.private_key_pem
    assert files[TLS_PRIVATE_KEY_PATH]["permissions"] == "0600"
    assert files[NGINX_BEARER_PATH]["permissions"] == "0600"
    assert files[TLS_PRIVATE_KEY_PATH]["owner"] == "root:root"
    assert MATERIAL.bearer_token in files[NGINX_BEARER_PATH]["content"]
    assert MATERIAL.bearer_token not in files[NGINX_SITE_PATH]["content"]
    assert 'Environment="OLLAMA_HOST=127.0.0.1:11434"' in (
        files[OLLAMA_DROP_IN_PATH]["content"]
    )
    assert "nginx" in document["packages"]


@pytest.mark.parametrize(
    "directive",
    [
        "listen 11443 ssl;",
        f"server_name {SERVICE_NAME};",
        f"ssl_certificate {TLS_CERTIFICATE_PATH};",
        f"ssl_certificate_key {TLS_PRIVATE_KEY_PATH};",
        f"include {NGINX_BEARER_PATH};",
        "server 127.0.0.1:11434;",
        "proxy_set_header Host 127.0.0.1:11434;",
        'proxy_set_header Authorization "";',
        "proxy_http_version 1.1;",
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "client_max_body_size 0;",
        "proxy_read_timeout 3600s;",
    ],
)
def test_nginx_site_directive(directive: str):
    site = files_of(yaml.safe_load(render_user_data(settings())))[NGINX_SITE_PATH]

    assert any(line.strip() == directive for line in site["content"].splitlines())


def test_nginx_starts_after_ollama_before_pulls():
    runcmd = yaml.safe_load(render_user_data(settings()))["runcmd"]
    wait = next(i for i, item in enumerate(runcmd) if str(item).startswith("attempt"))
    restart = runcmd.index(["systemctl", "restart", "nginx"])
    check = runcmd.index(["nginx", "-t", "-q"])
    default_site = runcmd.index(["rm", "-f", "/etc/nginx/sites-enabled/default"])
    pull = runcmd.index(["ollama", "pull", "granite3.1-dense:8b"])

    assert wait < default_site < check < restart < pull


def test_no_terminator_no_nginx():
    text = render_user_data(UserDataSettings(models=(), gpu=False))

    assert "nginx" not in text
    assert "BEGIN" not in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ollama_host": "0.0.0.0"}, "must listen on a loopback address"),
        ({"ollama_host": "10.0.0.5"}, "must listen on a loopback address"),
        ({"ollama_host": "localhost"}, "must listen on a loopback address"),
        ({"terminator": terminator(port=11434)}, "Ollama already listens on it"),
    ],
)
def test_settings_reject_terminator_layout(overrides: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        settings(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"bearer_token": "short"},
        {"bearer_token": 'with"quote-and-more-chars'},
        {"bearer_token": "with$variable-and-more-chars"},
        {"bearer_token": "with space and-more-chars"},
        {"private_key_pem": "not a key at all, just some words"},
        {"certificate_pem": "not a certificate"},
        {"server_name": "bad name"},
        {"port": 0},
    ],
)
def test_terminator_rejects_values(overrides: dict[str, Any]):
    with pytest.raises(ValueError) as raised:
        terminator(**overrides)

    if "bearer_token" in overrides or "private_key_pem" in overrides:
        assert next(iter(overrides.values())) not in str(raised.value)


def test_terminator_repr_hides_secrets():
    text = repr(settings())

    assert MATERIAL.bearer_token not in text
    assert "PRIVATE KEY" not in text


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_simulator_reads_terminator(gpu: bool):
    boot = parse_user_data(encode_user_data(render_user_data(settings(gpu=gpu))))

    assert boot.port == 11434
    assert boot.models == ("granite3.1-dense:8b",)
    assert boot.terminator.port == 11443
    assert boot.terminator.certificate_pem == MATERIAL.certificate_pem
    assert boot.terminator.private_key_pem == MATERIAL.private_key_pem
    assert boot.terminator.bearer_token == MATERIAL.bearer_token


# A real nginx, when the host has one, runs the rendered site on loopback in front
# of a small upstream that replaces Ollama.

NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
)
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed; apt-get install nginx-light"
)


class _Upstream(Resource):
    """
    Stream three lines 0.2 s apart for /stream, and count the bytes of a POST.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.first_line_sent: float | None = None

    def render_GET(self, request):
        self.requests.append(
            {
                "host": request.getHeader(b"host"),
                "authorization": request.getHeader(b"authorization"),
            }
        )
        request.setHeader(b"content-type", b"application/x-ndjson")

        def write(index: int) -> None:
            if index == 0:
                self.first_line_sent = time.monotonic()
            request.write(b'{"line": %d}\n' % index)
            if index == 2:
                request.finish()
            else:
                reactor.callLater(0.2, write, index + 1)

        write(0)
        return NOT_DONE_YET

    def render_POST(self, request):
        size = len(request.content.read())
        self.requests.append({"size": size})
        return b'{"size": %d}' % size


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on port {port}")


@pytest.fixture
def nginx_site(tmp_path: Path):
    upstream = _Upstream()
    upstream_port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
    port = free_port()
    rendered = UserDataSettings(
        models=(),
        gpu=False,
        ollama_host="127.0.0.1",
        ollama_port=upstream_port.getHost().port,
        terminator=terminator(port=port),
    )
    files = files_of(yaml.safe_load(render_user_data(rendered)))
    paths = {
        TLS_CERTIFICATE_PATH: tmp_path / "backend.crt",
        TLS_PRIVATE_KEY_PATH: tmp_path / "backend.key",
        NGINX_BEARER_PATH: tmp_path / "bearer.conf",
    }
    for original, copy in paths.items():
        copy.write_text(files[original]["content"])
    site = files[NGINX_SITE_PATH]["content"].replace(
        f"listen {port} ssl;", f"listen 127.0.0.1:{port} ssl;"
    )
    for original, copy in paths.items():
        site = site.replace(original, str(copy))
    (tmp_path / "site.conf").write_text(site)
    temporary = "\n".join(
        f"    {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\npid {tmp_path / 'nginx.pid'};\n"
        "error_log stderr warn;\nevents { worker_connections 64; }\n"
        f"http {{\n    access_log off;\n{temporary}\n"
        f"    include {tmp_path / 'site.conf'};\n}}\n"
    )
    command = [NGINX, "-e", "stderr", "-p", str(tmp_path), "-c", "nginx.conf"]

    checked = subprocess.run(
        [*command, "-t"], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr

    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        _wait_for_port(port)
        yield upstream, port, upstream_port.getHost().port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()
        pytest_twisted.blockon(upstream_port.stopListening())


def _agent(port: int, with_secret: bool) -> Any:
    policy = BackendTLSPolicy(reactor)
    policy.pin("127.0.0.1", port, MATERIAL)
    agent = Agent(reactor, contextFactory=policy)
    return BackendAgent(agent, policy) if with_secret else agent


@needs_nginx
@pytest_twisted.inlineCallbacks
def test_nginx_rejects_requests_without_secret(nginx_site):
    upstream, port, _ = nginx_site
    url = f"https://127.0.0.1:{port}/stream".encode()

    response = yield _agent(port, with_secret=False).request(b"GET", url)
    yield treq.content(response)

    assert response.code == 401
    assert upstream.requests == []


@needs_nginx
@pytest_twisted.inlineCallbacks
def test_nginx_streams_without_buffering(nginx_site):
    upstream, port, upstream_number = nginx_site
    url = f"https://127.0.0.1:{port}/stream".encode()
    arrivals: list[float] = []

    response = yield _agent(port, with_secret=True).request(b"GET", url)
    yield treq.collect(response, lambda data: arrivals.append(time.monotonic()))

    assert response.code == 200
    assert len(arrivals) >= 2
    # The first line arrives long before the last one is sent.
    assert arrivals[0] - upstream.first_line_sent < 0.15
    assert arrivals[-1] - arrivals[0] > 0.3
    assert upstream.requests[0]["authorization"] is None
    assert upstream.requests[0]["host"] == b"127.0.0.1:%d" % upstream_number


@needs_nginx
@pytest_twisted.inlineCallbacks
def test_nginx_accepts_large_bodies(nginx_site):
    _, port, _ = nginx_site
    url = f"https://127.0.0.1:{port}/upload".encode()
    size = 3 * 1024 * 1024
    body = FileBodyProducer(BytesIO(b"x" * size))
    response = yield _agent(port, with_secret=True).request(
        b"POST", url, bodyProducer=body
    )
    answer = yield treq.json_content(response)

    assert response.code == 200
    assert answer == {"size": size}
