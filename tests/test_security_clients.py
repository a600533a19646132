"""
The path from LAN clients to exoproxy: bearer tokens from --api-key-file, the
systemd credential or the environment, and TLS on the listener through an ssl:
endpoint string, tested with the official ollama client over loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import ollama
import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, capturedLogs
from twisted.web.test.requesthelper import DummyRequest

from exoproxy.auth import ClientTokens, parse_tokens, read_tokens
from exoproxy.config import ConfigError
from exoproxy.tap import Options
from tests.daemon import simulated_arguments, start_daemon

MODEL = "granite3.1-dense:8b"
TOKEN = "token-one-" + "a" * 22
OTHER_TOKEN = "token-two-" + "b" * 22
ORIGIN = "http://localhost:5173"


@inlineCallbacks
def wait_until_ready(base_url: str, token: str, timeout: float = 30.0):
    """
    Poll /status with a token until the instance is ready.
    """
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(int(timeout / 0.05)):
        response = yield treq.get(f"{base_url}/status", headers=headers)
        status = yield treq.json_content(response)
        if status["provisioning_status"] == "ready":
            return status
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"the instance was not ready within {timeout} s")


def write_tokens(path: Path) -> Path:
    path.write_text(
        f"# clients of the lab\n\n  {TOKEN}  \n# {'c' * 20}\n{OTHER_TOKEN}\n"
    )
    return path


@pytest.fixture
def daemon(tmp_path: Path):
    arguments = simulated_arguments(api_key_file=write_tokens(tmp_path / "keys"))
    started = pytest_twisted.blockon(start_daemon(arguments))
    yield started
    pytest_twisted.blockon(started[0].stopService())


@pytest_twisted.inlineCallbacks
def test_requests_without_token_get_401(daemon):
    service, base_url = daemon
    cases = {
        "missing": {},
        "wrong": {"Authorization": "Bearer " + "z" * 32},
        "basic": {"Authorization": f"Basic {TOKEN}"},
        "prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    }
    for name, headers in cases.items():
        for method, path in (("GET", "/status"), ("POST", "/api/generate")):
            response = yield treq.request(
                method, f"{base_url}{path}", headers=headers, data=b"{}"
            )
            body = yield treq.json_content(response)

            assert response.code == 401, (name, path)
            assert response.headers.getRawHeaders(b"www-authenticate") == [
                b'Bearer realm="exoproxy"'
            ], name
            assert list(body) == ["error"], name
            assert "API key" in body["error"], name
    assert service.simulator.cloud.calls == []


@pytest_twisted.inlineCallbacks
def test_two_authorization_headers_rejected(daemon):
    _, base_url = daemon
    response = yield treq.get(
        f"{base_url}/api/tags",
        headers={"Authorization": [f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}"]},
    )
    yield treq.content(response)

    assert response.code == 401


@pytest_twisted.inlineCallbacks
def test_heartbeat_and_preflight_open(daemon):
    _, base_url = daemon
    heartbeat = yield treq.get(f"{base_url}/")
    heartbeat_body = yield treq.content(heartbeat)
    head = yield treq.head(f"{base_url}/")
    preflight = yield treq.request(
        "OPTIONS",
        f"{base_url}/api/chat",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    yield treq.content(preflight)
    post_root = yield treq.post(f"{base_url}/")
    yield treq.content(post_root)

    assert heartbeat.code == 200
    assert heartbeat_body == b"Ollama is running"
    assert head.code == 200
    assert preflight.code == 204
    assert (
        b"Authorization"
        in preflight.headers.getRawHeaders(b"access-control-allow-headers")[0]
    )
    assert post_root.code == 401


@pytest_twisted.inlineCallbacks
def test_browser_sees_401_with_cors(daemon):
    _, base_url = daemon
    response = yield treq.get(f"{base_url}/api/tags", headers={"Origin": ORIGIN})
    yield treq.content(response)

    assert response.code == 401
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [
        ORIGIN.encode()
    ]


@pytest_twisted.inlineCallbacks
def test_ollama_client_with_api_key(daemon, monkeypatch):
    service, base_url = daemon
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    anonymous = ollama.Client(host=base_url)
    monkeypatch.setenv("OLLAMA_API_KEY", OTHER_TOKEN)
    client = ollama.Client(host=base_url)

    with pytest.raises(ollama.ResponseError) as raised:
        yield deferToThread(anonymous.list)
    listed = yield deferToThread(client.list)
    with pytest.raises(ollama.ResponseError) as cold:
        yield deferToThread(client.generate, MODEL, "hi")
    status = yield wait_until_ready(base_url, TOKEN)

    def stream():
        return [part.response for part in client.generate(MODEL, "hi", stream=True)]

    pieces = yield deferToThread(stream)

    assert raised.value.status_code == 401
    assert MODEL in [model.model for model in listed.models]
    assert cold.value.status_code == 503
    assert len(pieces) > 1
    assert status["client_authentication"] is True
    assert service.gateway._client_tokens.rejected == 1


def causes(error: BaseException | None) -> list[str]:
    found = []
    while error is not None:
        found.append(repr(error))
        error = error.__cause__ or error.__context__
    return found


def self_signed_for_loopback(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path = directory / "key.pem"
    cert_path = directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest_twisted.inlineCallbacks
def test_tls_listener_with_ollama_client(tmp_path: Path, monkeypatch):
    key_path, cert_path = self_signed_for_loopback(tmp_path)
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
    arguments = simulated_arguments(
        listen=listen, api_key_file=write_tokens(tmp_path / "keys")
    )
    service, plain_url = yield start_daemon(arguments)
    try:
        port = int(plain_url.rsplit(":", 1)[1])
        base_url = f"https://127.0.0.1:{port}"
        monkeypatch.setenv("OLLAMA_API_KEY", TOKEN)
        client = ollama.Client(host=base_url, verify=str(cert_path), trust_env=False)
        untrusting = ollama.Client(host=base_url, trust_env=False)

        listed = yield deferToThread(client.list)
        with pytest.raises(Exception) as raised:
            yield deferToThread(untrusting.list)
        with pytest.raises(ollama.ResponseError):
            yield deferToThread(client.generate, MODEL, "hi")

        def stream_when_ready():
            import time

            for _ in range(300):
                try:
                    return list(client.generate(MODEL, "hi", stream=True))
                except ollama.ResponseError as error:
                    if error.status_code != 503:
                        raise
                    time.sleep(0.1)
            raise AssertionError("the instance never became ready")

        parts = yield deferToThread(stream_when_ready)
        plain = yield treq.get(f"http://127.0.0.1:{port}/", timeout=5).addCallbacks(
            lambda response: response.code, lambda failure: None
        )
    finally:
        yield service.stopService()

    assert MODEL in [model.model for model in listed.models]
    assert "CERTIFICATE_VERIFY_FAILED" in " ".join(causes(raised.value))
    assert len(parts) > 1
    assert parts[-1].done
    assert plain != 200


def test_parse_tokens_skips_comments_and_blanks():
    text = f"# comment\n\n   \n{TOKEN}\n  {OTHER_TOKEN}  \n#{TOKEN}x\n"

    assert parse_tokens(text, "test") == (TOKEN, OTHER_TOKEN)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no token found"),
        ("# only a comment\n\n", "no token found"),
        (f"{TOKEN}\nbad token with spaces\n", "line 2 is not a valid bearer token"),
        (f'{TOKEN}\n"{OTHER_TOKEN}"\n', "line 2 is not a valid bearer token"),
        ("short\n", "the token on line 1 is shorter than 16"),
    ],
)
def test_parse_tokens_rejects(text: str, message: str):
    with pytest.raises(ConfigError) as raised:
        parse_tokens(text, "EXOPROXY_API_KEYS")

    assert message in str(raised.value)
    assert str(raised.value).startswith("EXOPROXY_API_KEYS: ")
    assert "bad token" not in str(raised.value)
    assert OTHER_TOKEN not in str(raised.value)


def test_read_tokens_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_tokens(str(tmp_path / "missing"))


def config_from(arguments: list[str], environ: dict[str, str]):
    options = Options(environ=environ)
    options.parseOptions(["--simulate", *arguments])
    return options.config


def test_tokens_from_each_source(tmp_path: Path):
    keys = write_tokens(tmp_path / "keys")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "exoproxy-api-keys").write_text(f"# lab\n{OTHER_TOKEN}\n")

    from_option = config_from(["--api-key-file", str(keys)], {})
    from_variable = config_from([], {"EXOPROXY_API_KEY_FILE": str(keys)})
    from_credential = config_from([], {"CREDENTIALS_DIRECTORY": str(credentials)})
    from_environment = config_from([], {"EXOPROXY_API_KEYS": f"{TOKEN} {OTHER_TOKEN}"})
    option_wins = config_from(
        ["--api-key-file", str(keys)], {"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    none = config_from([], {"CREDENTIALS_DIRECTORY": str(tmp_path)})

    assert from_option.client_tokens == (TOKEN, OTHER_TOKEN)
    assert from_variable.client_tokens == (TOKEN, OTHER_TOKEN)
    assert from_credential.client_tokens == (OTHER_TOKEN,)
    assert from_environment.client_tokens == (TOKEN, OTHER_TOKEN)
    assert option_wins.client_tokens == (TOKEN, OTHER_TOKEN)
    assert none.client_tokens == ()
    assert TOKEN not in repr(from_option)


def test_bad_token_file_stops_startup(tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("# nothing here\n")

    with pytest.raises(SystemExit) as raised:
        config_from(["--api-key-file", str(keys)], {})

    assert f"--api-key-file {str(keys)!r}: no token found" in str(raised.value)


def test_origins_from_option_and_environment():
    from_option = config_from(
        ["--allow-origin", "https://webui.example.com", "--allow-origin", "*"], {}
    )
    from_environment = config_from([], {"OLLAMA_ORIGINS": " http://*.lan:* , app://*,"})

    assert from_option.allowed_origins == ("https://webui.example.com", "*")
    assert from_environment.allowed_origins == ("http://*.lan:*", "app://*")


@pytest.mark.parametrize(
    "origin",
    [
        "webui.lan",
        "https://webui.example.com/",
        "http://a.lan/chat",
        "http:// x",
        "http://localhost:99999",
    ],
)
def test_invalid_origin_stops_startup(origin: str):
    with pytest.raises(SystemExit) as raised:
        config_from(["--allow-origin", origin], {})
    with pytest.raises(SystemExit) as from_environment:
        config_from([], {"OLLAMA_ORIGINS": origin})

    assert f"--allow-origin: invalid origin {origin!r}" in str(raised.value)
    assert f"OLLAMA_ORIGINS: invalid origin {origin!r}" in str(from_environment.value)


def request_with(authorization: bytes | None) -> DummyRequest:
    request = DummyRequest([b"api", b"tags"])
    if authorization is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [authorization])
    return request


@pytest.mark.parametrize(
    "authorization, accepted",
    [
        (f"Bearer {TOKEN}".encode(), True),
        (f"bearer {OTHER_TOKEN}".encode(), True),
        (f"Bearer  {TOKEN} ".encode(), True),
        (f"Bearer {TOKEN}x".encode(), False),
        (TOKEN.encode(), False),
        (b"Bearer", False),
        (b"", False),
        (None, False),
    ],
)
def test_client_tokens_accepts(authorization: bytes | None, accepted: bool):
    tokens = ClientTokens([TOKEN, OTHER_TOKEN], Clock())

    assert tokens.accepts(request_with(authorization)) is accepted


def test_rejections_logged_at_most_once_a_minute():
    clock = Clock()
    tokens = ClientTokens([TOKEN], clock)

    with capturedLogs() as events:
        for _ in range(5):
            tokens.record_rejection(request_with(None), "/api/tags")
            clock.advance(1)
        clock.advance(60)
        tokens.record_rejection(request_with(None), "/api/tags")

    warnings = [event for event in events if event["log_level"] == LogLevel.warn]
    assert [event["count"] for event in warnings] == [1, 5]
    assert tokens.rejected == 6
