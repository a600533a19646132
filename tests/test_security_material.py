"""
The instance key material: its generation, its files, the keyring that binds it to
an instance, and the TLS policy and agent that use it, over real loopback TLS.
"""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from exoproxy.backend_agent import (
    BackendAgent,
    BackendEndpoints,
    BackendTLSPolicy,
    find_tls_error,
)
from exoproxy.backend_tls import (
    SERVICE_NAME,
    BackendKeyring,
    BackendMaterial,
    MaterialError,
    MaterialStore,
    default_state_dir,
    generate_material,
)
from exoproxy.tap import Options

NOW = 1_800_000_000.0


def test_material_certificate_properties():
    material = generate_material(NOW)
    certificate = x509.load_pem_x509_certificate(material.certificate_pem.encode())
    key = serialization.load_pem_private_key(
        material.private_key_pem.encode(), password=None
    )

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert certificate.public_key() == key.public_key()
    assert certificate.issuer == certificate.subject
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [SERVICE_NAME]
    common_name = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert common_name[0].value == SERVICE_NAME
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is False
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(usages.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    start = datetime.datetime.fromtimestamp(NOW, tz=datetime.timezone.utc)
    assert certificate.not_valid_before_utc < start
    assert certificate.not_valid_after_utc > start + datetime.timedelta(days=3000)


def test_material_fresh_each_time():
    first, second = generate_material(NOW), generate_material(NOW)

    assert first.private_key_pem != second.private_key_pem
    assert first.certificate_pem != second.certificate_pem
    assert first.bearer_token != second.bearer_token
    assert len(first.bearer_token) >= 40
    assert first.fingerprint != second.fingerprint


def test_material_repr_hides_secrets():
    material = generate_material(NOW)

    assert material.bearer_token not in repr(material)
    assert "PRIVATE KEY" not in repr(material)


def test_store_modes_and_round_trip(tmp_path: Path):
    store = MaterialStore(tmp_path / "state")
    material = generate_material(NOW)

    store.save("exoproxy", material)

    files = list(store.directory.iterdir())
    assert [path.name for path in files] == ["instance-exoproxy.json"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert MaterialStore(tmp_path / "state").load("exoproxy") == material


def test_store_tightens_open_directory(tmp_path: Path):
    store = MaterialStore(tmp_path)
    store.directory.mkdir(mode=0o755)
    store.directory.chmod(0o755)

    store.save("exoproxy", generate_material(NOW))

    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700


def test_store_prepare_rejects_unwritable(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(MaterialError) as raised:
        MaterialStore(blocker / "state").prepare()

    assert str(blocker / "state") in str(raised.value)
    assert str(raised.value).startswith("--state-dir: cannot keep key material")


def test_store_file_names_stay_inside(tmp_path: Path):
    store = MaterialStore(tmp_path)

    store.save("../escape/name", generate_material(NOW))

    assert [path.parent for path in tmp_path.rglob("*.json")] == [store.directory]
    assert store.load("../escape/name") is not None
    assert store.load("other") is None


def test_store_corrupt_file_names_path_only(tmp_path: Path):
    store = MaterialStore(tmp_path)
    store.save("exoproxy", generate_material(NOW))
    path = next(store.directory.iterdir())
    path.write_text('{"certificate": "secret-looking-content"')

    with pytest.raises(MaterialError) as raised:
        store.load("exoproxy")

    assert str(path) in str(raised.value)
    assert "secret-looking-content" not in str(raised.value)


def make_keyring(tmp_path: Path) -> tuple[BackendKeyring, BackendTLSPolicy]:
    clock = Clock()
    clock.advance(NOW)
    policy = BackendTLSPolicy(clock)
    keyring = BackendKeyring(MaterialStore(tmp_path), policy, "exoproxy", clock)
    return keyring, policy


def test_keyring_binds_and_pins(tmp_path: Path):
    keyring, policy = make_keyring(tmp_path)
    material = keyring.new_material()
    keyring.bind("i-1", material)

    url = keyring.backend_url("i-1", "127.0.0.5", 11443)

    assert url == "https://127.0.0.5:11443"
    assert policy.material_at("127.0.0.5", 11443).bearer_token == material.bearer_token
    assert policy.material_at("127.0.0.6", 11443) is None
    assert policy.pinned_material().instance_id == "i-1"


def test_keyring_survives_restart(tmp_path: Path):
    first, _ = make_keyring(tmp_path)
    material = first.bind("i-1", first.new_material())

    second, policy = make_keyring(tmp_path)
    second.backend_url("i-1", "127.0.0.5", 11443)

    assert policy.pinned_material() == material


def test_keyring_adopts_unbound_material(tmp_path: Path):
    keyring, _ = make_keyring(tmp_path)
    material = keyring.new_material()

    adopted = keyring.material_for("i-7")

    assert adopted.bearer_token == material.bearer_token
    assert MaterialStore(tmp_path).load("exoproxy").instance_id == "i-7"


def test_keyring_missing_material(tmp_path: Path):
    keyring, _ = make_keyring(tmp_path)

    with pytest.raises(MaterialError, match="no key material for instance i-1"):
        keyring.backend_url("i-1", "127.0.0.5", 11443)


def test_keyring_material_of_other_instance(tmp_path: Path):
    keyring, policy = make_keyring(tmp_path)
    keyring.bind("i-1", keyring.new_material())

    with pytest.raises(MaterialError, match="belongs to instance i-1, not i-2"):
        keyring.backend_url("i-2", "127.0.0.5", 11443)
    assert policy.pinned_material() is None


def test_new_material_replaces_old(tmp_path: Path):
    keyring, _ = make_keyring(tmp_path)
    old = keyring.bind("i-1", keyring.new_material())

    new = keyring.bind("i-2", keyring.new_material())

    assert keyring.material_for("i-2") == new
    assert new.private_key_pem != old.private_key_pem


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"STATE_DIRECTORY": "/run/state/exoproxy"}, "/run/state/exoproxy"),
        ({"STATE_DIRECTORY": "/srv/a:/srv/b"}, "/srv/a"),
    ],
)
def test_state_dir_from_systemd(environ: dict[str, str], expected: str):
    assert default_state_dir(environ) == Path(expected)


def test_state_dir_fallback_to_home(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)

    assert default_state_dir({}, home=tmp_path) == (
        tmp_path / ".local" / "state" / "exoproxy"
    )
    assert default_state_dir({"XDG_STATE_HOME": "/x"}, home=tmp_path) == Path(
        "/x/exoproxy"
    )


def test_state_dir_system_when_writable(monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: True)

    assert default_state_dir({}) == Path("/var/lib/exoproxy")


class _Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list[bytes | None] = []

    def render(self, request):
        self.authorizations.append(request.getHeader(b"authorization"))
        return b"ok"


def _certificate_for(name: str) -> BackendMaterial:
    """
    Return material whose self-signed certificate names `name` instead of the
    service name.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(hours=1))
        .not_valid_after(start + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .sign(key, hashes.SHA256())
    )
    return BackendMaterial(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        bearer_token="t" * 43,
        created_at=NOW,
    )


@pytest_twisted.inlineCallbacks
def _serve(material: BackendMaterial, resource: Resource):
    pair = PrivateCertificate.loadPEM(
        material.certificate_pem + material.private_key_pem
    )
    endpoint = SSL4ServerEndpoint(reactor, 0, pair.options(), interface="127.0.0.1")
    port = yield endpoint.listen(Site(resource))
    return port


@pytest_twisted.inlineCallbacks
def test_agent_verifies_and_sends_secret():
    material = generate_material(reactor.seconds())
    echo = _Echo()
    port = yield _serve(material, echo)
    try:
        policy = BackendTLSPolicy(reactor)
        policy.pin("127.0.0.1", port.getHost().port, material)
        agent = BackendAgent(Agent(reactor, contextFactory=policy), policy)
        url = f"https://127.0.0.1:{port.getHost().port}/"
        client_headers = Headers({b"authorization": [b"Bearer client-token"]})

        response = yield agent.request(b"GET", url.encode(), client_headers)
        body = yield treq.content(response)
    finally:
        yield port.stopListening()

    assert body == b"ok"
    assert echo.authorizations == [f"Bearer {material.bearer_token}".encode()]
    assert client_headers.getRawHeaders(b"authorization") == [b"Bearer client-token"]
    assert policy.status()["rejected_connections"] == 0


@pytest_twisted.inlineCallbacks
def test_agent_rejects_certificate_for_other_name():
    # A certificate that is the pinned trust root, but for another name, must still
    # fail the host name check of service_identity.
    material = _certificate_for("other.example")
    echo = _Echo()
    port = yield _serve(material, echo)
    try:
        policy = BackendTLSPolicy(reactor)
        policy.pin("127.0.0.1", port.getHost().port, material)
        agent = BackendAgent(Agent(reactor, contextFactory=policy), policy)
        url = f"https://127.0.0.1:{port.getHost().port}/"

        with pytest.raises(Exception) as raised:
            yield agent.request(b"POST", url.encode())
    finally:
        yield port.stopListening()

    assert find_tls_error(raised.value) is not None
    assert echo.authorizations == []
    status = policy.status()
    assert status["rejected_connections"] == 1
    assert status["last_rejection"]["expected_certificate"] == material.fingerprint


@pytest_twisted.inlineCallbacks
def test_agent_never_sends_secret_in_clear():
    echo = _Echo()
    port = yield reactor.listenTCP(0, Site(echo), interface="127.0.0.1")
    try:
        policy = BackendTLSPolicy(reactor)
        number = port.getHost().port
        policy.pin("127.0.0.1", number, generate_material(reactor.seconds()))
        agent = BackendAgent(Agent(reactor), policy)

        response = yield agent.request(b"GET", f"http://127.0.0.1:{number}/".encode())
        yield treq.content(response)
    finally:
        yield port.stopListening()

    assert echo.authorizations == [None]


def real_config(*arguments: str, **environ: str):
    options = Options(
        environ={"EXOSCALE_API_KEY": "EXOtest", "EXOSCALE_API_SECRET": "s", **environ}
    )
    options.parseOptions(["--allow-cidr", "203.0.113.7/32", *arguments])
    return options.config


def test_real_mode_backend_port_default():
    config = real_config(STATE_DIRECTORY="/var/lib/private/exoproxy")

    assert config.backend_port == 11443
    assert config.state_dir == "/var/lib/private/exoproxy"
    assert config.ssh_networks == ()


def test_real_mode_rejects_ollama_port():
    with pytest.raises(SystemExit) as raised:
        real_config("--backend-port", "11434")

    assert "--backend-port: 11434 is where Ollama listens" in str(raised.value)


def test_state_dir_option_wins(tmp_path: Path):
    config = real_config("--state-dir", str(tmp_path), STATE_DIRECTORY="/elsewhere")

    assert config.state_dir == str(tmp_path)


def test_simulate_state_dir_temporary():
    options = Options(environ={"STATE_DIRECTORY": "/elsewhere"})
    options.parseOptions(["--simulate"])

    assert options.config.state_dir is None


def test_ssh_networks_parsed():
    config = real_config(
        "--allow-ssh-cidr", "198.51.100.0/24", "--allow-ssh-cidr", "192.0.2.1"
    )

    assert config.ssh_networks == ("198.51.100.0/24", "192.0.2.1/32")
    with pytest.raises(SystemExit, match="--allow-ssh-cidr: invalid network"):
        real_config("--allow-ssh-cidr", "not-a-network")


@pytest.mark.parametrize(
    ("option", "value", "suggestions"),
    [
        ("--allow-cidr", "203.0.113.7/24", ("203.0.113.0/24", "203.0.113.7/32")),
        ("--allow-ssh-cidr", "2001:db8::1/64", ("2001:db8::/64", "2001:db8::1/128")),
    ],
)
def test_network_with_host_bits_rejected(option, value, suggestions):
    with pytest.raises(SystemExit) as raised:
        real_config(option, value)

    message = str(raised.value)
    assert f"{option}: invalid network {value!r}: it has host bits set" in message
    for suggestion in suggestions:
        assert suggestion in message


def cached_agent(policy: BackendTLSPolicy) -> BackendAgent:
    endpoints = BackendEndpoints(reactor, policy, connect_timeout=5)
    pool = HTTPConnectionPool(reactor, persistent=False)
    return BackendAgent(Agent.usingEndpointFactory(reactor, endpoints, pool), policy)


def test_endpoints_reused_per_address():
    policy = BackendTLSPolicy(reactor)
    endpoints = BackendEndpoints(reactor, policy, connect_timeout=5)
    first = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:9/api/tags"))
    again = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:9/api/show"))
    other = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:10/"))

    assert again is first
    assert other is not first
    with pytest.raises(SchemeNotSupported):
        endpoints.endpointForURI(URI.fromBytes(b"ftp://127.0.0.1:9/"))


def test_endpoint_rebuilt_after_new_pin():
    policy = BackendTLSPolicy(reactor)
    endpoints = BackendEndpoints(reactor, policy, connect_timeout=5)
    uri = URI.fromBytes(b"https://127.0.0.1:11443/api/tags")
    policy.pin("127.0.0.1", 11443, generate_material(NOW))
    first = endpoints.endpointForURI(uri)
    again = endpoints.endpointForURI(uri)
    policy.pin("127.0.0.1", 11443, generate_material(NOW))
    repinned = endpoints.endpointForURI(uri)

    assert again is first
    assert repinned is not first


@pytest_twisted.inlineCallbacks
def test_cached_endpoint_trusts_only_new_pin():
    # The same address presents a new certificate, as a recreated instance with
    # the same IP address would. Until it is pinned, the cached endpoint must
    # reject it, and once it is pinned, it must accept it.
    now = reactor.seconds()
    old, new = generate_material(now), generate_material(now)
    port = yield _serve(old, _Echo())
    number = port.getHost().port
    url = f"https://127.0.0.1:{number}/".encode()
    policy = BackendTLSPolicy(reactor)
    policy.pin("127.0.0.1", number, old)
    agent = cached_agent(policy)
    try:
        response = yield agent.request(b"GET", url)
        first_body = yield treq.content(response)
    finally:
        yield port.stopListening()

    echo = _Echo()
    pair = PrivateCertificate.loadPEM(new.certificate_pem + new.private_key_pem)
    endpoint = SSL4ServerEndpoint(
        reactor, number, pair.options(), interface="127.0.0.1"
    )
    port = yield endpoint.listen(Site(echo))
    try:
        with pytest.raises(Exception) as raised:
            yield agent.request(b"GET", url)
        policy.pin("127.0.0.1", number, new)
        response = yield agent.request(b"GET", url)
        second_body = yield treq.content(response)
    finally:
        yield port.stopListening()

    assert first_body == b"ok"
    assert find_tls_error(raised.value) is not None
    assert second_body == b"ok"
    assert echo.authorizations == [f"Bearer {new.bearer_token}".encode()]
