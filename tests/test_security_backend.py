"""
The path from exoproxy to its instance, on the simulated cloud over real loopback
sockets: TLS with the certificate from the user-data, the bearer secret, a man in
the middle, the security group, and key material that outlives the daemon.
"""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from urllib.parse import urlsplit

import ollama
import pytest
import pytest_twisted
import treq
import yaml
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent

from exoproxy.backend_agent import BackendTLSPolicy
from exoproxy.backend_tls import generate_material
from exoproxy.simulator.service import SimulatorService
from exoproxy.simulator.timers import SimulatorTimings
from exoproxy.tap import Options, makeService
from exoproxy.userdata import NGINX_SITE_PATH, OLLAMA_DROP_IN_PATH, TLS_PRIVATE_KEY_PATH
from tests.daemon import free_port, get_json, simulated_arguments, wait_for_status

MODEL = "granite3.1-dense:8b"


@inlineCallbacks
def start(arguments: list[str]):
    options = Options(environ={})
    options.parseOptions(arguments)
    service = makeService(options)
    service.startService()
    ports = yield service.when_listening()
    return service, f"http://127.0.0.1:{ports[0].getHost().port}"


@inlineCallbacks
def bring_up(base_url: str):
    """
    Wake the instance with a request and wait until it is ready; return /status.
    """
    yield treq.post(f"{base_url}/api/show", json={"model": MODEL}).addCallback(
        treq.content
    )
    seen = yield wait_for_status(
        base_url, lambda status: status["provisioning_status"] == "ready"
    )
    return seen[-1]


def only_instance(service):
    instances = list(service.simulator.cloud.instances.values())
    assert len(instances) == 1
    return instances[0]


def user_data_of(instance) -> dict:
    raw = base64.b64decode(instance.attributes["user-data"])
    return yaml.safe_load(raw.decode())


@pytest.fixture
def daemon():
    started = pytest_twisted.blockon(start(simulated_arguments()))
    yield started
    pytest_twisted.blockon(started[0].stopService())


@pytest.fixture(scope="module")
def ready_daemon():
    """
    A daemon whose instance is up, shared by the tests that only read from it.
    """
    service, base_url = pytest_twisted.blockon(
        start(simulated_arguments(idle_timeout=600))
    )
    pytest_twisted.blockon(bring_up(base_url))
    yield service, base_url
    pytest_twisted.blockon(service.stopService())


@pytest_twisted.inlineCallbacks
def test_streams_over_verified_tls(ready_daemon):
    service, base_url = ready_daemon
    _, status = yield get_json(f"{base_url}/status")
    instance = only_instance(service)
    material = service.backend_tls.pinned_material()

    assert (
        status["remote_url"] == f"https://{instance.public_ip}:{instance.ollama_port}"
    )
    assert status["backend_tls"]["certificate_sha256"] == material.fingerprint
    assert status["backend_tls"]["rejected_connections"] == 0
    assert material.instance_id == instance.id

    client = ollama.Client(host=base_url)

    def stream():
        return [part.response for part in client.generate(MODEL, "hi", stream=True)]

    pieces = yield deferToThread(stream)
    assert len(pieces) > 1
    guard = instance.terminator_guard
    assert guard.accepted >= 3
    assert guard.rejected == 0


def test_instance_boots_terminator_from_user_data(ready_daemon):
    service, _ = ready_daemon
    instance = only_instance(service)
    material = service.backend_tls.pinned_material()
    document = user_data_of(instance)
    files = {entry["path"]: entry for entry in document["write_files"]}

    drop_in = files[OLLAMA_DROP_IN_PATH]["content"]
    assert 'Environment="OLLAMA_HOST=127.0.0.1:11434"' in drop_in
    assert files[TLS_PRIVATE_KEY_PATH]["permissions"] == "0600"
    assert files[TLS_PRIVATE_KEY_PATH]["content"] == material.private_key_pem
    assert f"listen {instance.ollama_port} ssl;" in files[NGINX_SITE_PATH]["content"]
    assert "nginx" in document["packages"]
    assert instance.boot.terminator.certificate_pem == material.certificate_pem


@pytest_twisted.inlineCallbacks
def test_backend_rejects_missing_secret(ready_daemon):
    service, _ = ready_daemon
    instance = only_instance(service)
    material = service.backend_tls.pinned_material()

    # A client that trusts the instance's certificate but has not its secret.
    policy = BackendTLSPolicy(reactor)
    policy.pin(instance.public_ip, instance.ollama_port, material)
    client = HTTPClient(Agent(reactor, contextFactory=policy))
    url = f"https://{instance.public_ip}:{instance.ollama_port}/api/tags"
    guard = instance.terminator_guard
    before = guard.rejected

    missing = yield client.get(url)
    yield treq.content(missing)
    wrong = yield client.get(url, headers={"Authorization": "Bearer " + "x" * 43})
    yield treq.content(wrong)
    other_scheme = yield client.get(
        url, headers={"Authorization": f"Basic {material.bearer_token}"}
    )
    yield treq.content(other_scheme)
    right = yield client.get(
        url, headers={"Authorization": f"Bearer {material.bearer_token}"}
    )
    body = yield treq.json_content(right)

    assert missing.code == 401
    assert wrong.code == 401
    assert other_scheme.code == 401
    assert guard.rejected == before + 3
    assert right.code == 200
    assert MODEL in [model["name"] for model in body["models"]]


class _Recorder(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)


@pytest_twisted.inlineCallbacks
def test_man_in_the_middle_refused(daemon):
    service, base_url = daemon
    yield bring_up(base_url)
    instance = only_instance(service)
    address, port = instance.public_ip, instance.ollama_port

    # The instance goes away, and another server takes its address, with its own
    # self-signed certificate for the same service name.
    yield instance.close()
    yield service._pool.closeCachedConnections()
    impostor = generate_material(reactor.seconds())
    pair = PrivateCertificate.loadPEM(
        impostor.certificate_pem + impostor.private_key_pem
    )
    factory = Factory.forProtocol(_Recorder)
    factory.connections = 0
    factory.received = []
    endpoint = SSL4ServerEndpoint(reactor, port, pair.options(), interface=address)
    listening = yield endpoint.listen(factory)
    try:
        marker = "prompt-that-must-not-leak"
        response = yield treq.post(
            f"{base_url}/api/generate",
            json={"model": MODEL, "prompt": marker, "stream": False},
        )
        answer = yield treq.json_content(response)
        _, status = yield get_json(f"{base_url}/status")
    finally:
        yield listening.stopListening()

    assert response.code == 502
    assert "TLS handshake" in answer["error"]
    assert factory.connections >= 1
    assert factory.received == []
    rejection = status["backend_tls"]["last_rejection"]
    assert status["backend_tls"]["rejected_connections"] >= 1
    assert rejection["address"] == f"{address}:{port}"
    assert rejection["instance_id"] == instance.id
    assert rejection["reason"] == "certificate verify failed"
    assert rejection["expected_certificate"] != impostor.fingerprint


@pytest_twisted.inlineCallbacks
def test_security_group_has_only_allowed_networks():
    arguments = simulated_arguments(
        allow_cidr="127.0.0.2/32", allow_ssh_cidr="127.0.0.9/32"
    )
    arguments += ["--allow-cidr", "127.0.0.3/32"]
    service, base_url = yield start(arguments)
    try:
        yield bring_up(base_url)
        groups = service.simulator.cloud.security_groups.list()
    finally:
        yield service.stopService()

    assert len(groups) == 1
    rules = groups[0]["rules"]
    backend = [
        rule for rule in rules if rule["start-port"] == service.config.backend_port
    ]
    ssh = [rule for rule in rules if rule["start-port"] == 22]
    assert sorted(rule["network"] for rule in backend) == [
        "127.0.0.2/32",
        "127.0.0.3/32",
    ]
    assert [rule["network"] for rule in ssh] == ["127.0.0.9/32"]
    assert len(rules) == 3
    for rule in rules:
        assert rule["flow-direction"] == "ingress"
        assert rule["protocol"] == "tcp"
        assert rule["start-port"] == rule["end-port"]


def test_security_group_closes_ssh_by_default(ready_daemon):
    service, _ = ready_daemon
    rules = service.simulator.cloud.security_groups.list()[0]["rules"]

    assert [rule["network"] for rule in rules] == ["127.0.0.0/8"]
    assert [rule["start-port"] for rule in rules] == [service.config.backend_port]


@pytest.fixture
def cloud():
    """
    A simulated zone that outlives the daemons of a test, as Exoscale does.
    """
    secret = "simulated-secret-" + "s" * 32
    simulator = SimulatorService(
        reactor,
        api_key="EXOrestart",
        api_secret=secret,
        timings=SimulatorTimings(
            operation_delay=0.05,
            start_delay=0.1,
            stop_delay=0.1,
            boot_delay=0.2,
            pull_delay=0.2,
            token_interval=0.01,
        ),
    )
    simulator.startService()
    api_url = pytest_twisted.blockon(simulator.when_listening())
    yield simulator, api_url, secret
    pytest_twisted.blockon(simulator.stopService())


def cloud_arguments(api_url: str, secret_file: Path, state_dir: Path, port: int):
    return [
        "--listen", "tcp:0:interface=127.0.0.1",
        "--api-key", "EXOrestart",
        "--api-secret-file", str(secret_file),
        "--exoscale-api-url", api_url,
        "--allow-cidr", "127.0.0.0/8",
        "--state-dir", str(state_dir),
        "--backend-port", str(port),
        "--poll-interval", "0.05",
        "--idle-timeout", "600",
        "--idle-check-interval", "0.1",
        "--ready-timeout", "30",
    ]  # fmt: skip


@pytest_twisted.inlineCallbacks
def test_material_survives_daemon_restart(cloud, tmp_path: Path):
    simulator, api_url, secret = cloud
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    state_dir = tmp_path / "state"
    port = free_port()
    arguments = cloud_arguments(api_url, secret_file, state_dir, port)

    first, first_url = yield start(arguments)
    try:
        yield bring_up(first_url)
        material = first.backend_tls.pinned_material()
    finally:
        yield first.stopService()

    files = list((state_dir / "backend-tls").iterdir())
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    assert [stat.S_IMODE(path.stat().st_mode) for path in files] == [0o600]

    second, second_url = yield start(arguments)
    try:
        status = yield bring_up(second_url)
        client = ollama.Client(host=second_url)
        answer = yield deferToThread(client.generate, MODEL, "hi", stream=False)
    finally:
        yield second.stopService()

    assert status["instance_id"] == material.instance_id
    assert status["backend_tls"]["certificate_sha256"] == material.fingerprint
    assert answer.done
    assert len(simulator.cloud.instances) == 1
    assert (
        len([c for c in simulator.cloud.calls if c.operation == "create-instance"]) == 1
    )


@pytest_twisted.inlineCallbacks
def test_lost_material_is_an_error(cloud, tmp_path: Path):
    simulator, api_url, secret = cloud
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    port = free_port()

    first, first_url = yield start(
        cloud_arguments(api_url, secret_file, tmp_path / "state", port)
    )
    try:
        yield bring_up(first_url)
    finally:
        yield first.stopService()

    second, second_url = yield start(
        cloud_arguments(api_url, secret_file, tmp_path / "empty", port)
    )
    try:
        yield treq.post(f"{second_url}/api/show", json={"model": MODEL})
        seen = yield wait_for_status(
            second_url, lambda status: status["provisioning_status"] == "error"
        )
    finally:
        yield second.stopService()

    error = seen[-1]["error"]
    assert "no key material for instance" in error
    assert "Delete the instance" in error
    assert seen[-1]["backend_tls"]["certificate_sha256"] is None


@pytest_twisted.inlineCallbacks
def test_wrong_secret_is_logged(cloud, tmp_path: Path):
    simulator, api_url, secret = cloud
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    state_dir = tmp_path / "state"
    arguments = cloud_arguments(api_url, secret_file, state_dir, free_port())

    first, first_url = yield start(arguments)
    try:
        yield bring_up(first_url)
    finally:
        yield first.stopService()
    [path] = (state_dir / "backend-tls").iterdir()
    document = json.loads(path.read_text())
    document["bearer_token"] = "w" * 43
    path.write_text(json.dumps(document))

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    second, second_url = yield start(arguments)
    try:
        yield treq.post(f"{second_url}/api/show", json={"model": MODEL})
        for _ in range(200):
            rejected = [e for e in events if "rejected exoproxy's bearer" in str(e)]
            if rejected:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        _, status = yield get_json(f"{second_url}/status")
    finally:
        yield second.stopService()
        globalLogPublisher.removeObserver(events.append)

    assert len(rejected) == 1
    assert rejected[0]["code"] == 401
    assert status["provisioning_status"] == "provisioning"
    assert only_instance_of(simulator).terminator_guard.rejected >= 1


def only_instance_of(simulator):
    [instance] = simulator.cloud.instances.values()
    return instance
