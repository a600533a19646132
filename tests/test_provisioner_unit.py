"""
Unit tests of the provisioning steps, with a task.Clock and a thread runner that
answers each SDK call from a script instead of a thread.

The integration tests run the same steps against the Exoscale API simulator with
the real SDK over HTTP; these tests pin down the order of calls and the polling.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from exoproxy.catalog import BackendCatalog
from exoproxy.cloud import ExoscaleCloud
from exoproxy.ollama_readiness import model_names
from exoproxy.provisioner import ExoscaleProvisioner
from exoproxy.tap import Options

MODEL = "granite3.1-dense:8b"


def make_config(**overrides: str):
    arguments = ["--simulate", "--poll-interval", "1", "--ready-timeout", "100"]
    for name, value in overrides.items():
        arguments += [f"--{name.replace('_', '-')}", value]
    options = Options(environ={})
    options.parseOptions(arguments)
    return options.config


class ScriptedRunner:
    """
    Answer SDK calls by method name, from a list of answers per method, and
    record every call.
    """

    def __init__(self, script: dict[str, list[Any]]) -> None:
        self.script = script
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, method, **arguments):
        name = method.__name__
        self.calls.append((name, arguments))
        answers = self.script[name]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Ollama:
    """
    Answer the readiness checks: down for a number of polls, then without the
    model for a number of polls, then ready.
    """

    def __init__(self, down_polls: int, pulling_polls: int) -> None:
        self.down_polls = down_polls
        self.pulling_polls = pulling_polls
        self.urls: list[str] = []

    def __call__(self, url: str):
        self.urls.append(url)
        if self.down_polls:
            self.down_polls -= 1
            return fail(ConnectionRefusedError())
        if url.endswith("/api/version"):
            return succeed({"version": "0.9.0"})
        if self.pulling_polls:
            self.pulling_polls -= 1
            return succeed({"models": []})
        return succeed({"models": [{"name": MODEL, "model": MODEL}]})


def make_provisioner(script, ollama, config=None):
    clock = Clock()
    config = config or make_config()
    runner = ScriptedRunner(script)
    cloud = ExoscaleCloud(
        None,
        clock,
        api_url="http://127.0.0.1:1/v2",
        api_key="EXOtest",
        api_secret="secret",
        timeout=5,
        max_threads=1,
        poll_interval=config.poll_interval,
        run_in_thread=runner,
    )
    catalog = BackendCatalog(config.model)
    provisioner = ExoscaleProvisioner(cloud, clock, config, ollama, catalog)
    return clock, runner, provisioner, catalog


def instance(state: str, address: str = "127.0.0.9") -> dict[str, Any]:
    return {
        "id": "5f0c9c5e-0000-4000-8000-000000000001",
        "state": state,
        "public-ip": address,
        "labels": {"managed-by": "exoproxy", "exoproxy-name": "exoproxy"},
    }


def operation(state: str, reference: str = "5f0c9c5e-0000-4000-8000-000000000001"):
    return {"id": "op-1", "state": state, "reference": {"id": reference}}


def run(clock: Clock, provisioner: ExoscaleProvisioner, seconds: int = 60):
    phases: list[str] = []
    results: list[Any] = []
    provisioner.bring_up(phases.append).addBoth(results.append)
    for _ in range(seconds):
        clock.advance(1)
    return phases, results


def test_running_instance_goes_to_readiness():
    ollama = Ollama(down_polls=2, pulling_polls=2)
    clock, runner, provisioner, catalog = make_provisioner(
        {
            "list_instances": [{"instances": [instance("running")]}],
            "get_instance": [instance("running")],
        },
        ollama,
    )
    phases, results = run(clock, provisioner)

    backend = results[0]
    assert backend.url == "http://127.0.0.9:11435"
    assert backend.instance_id == instance("running")["id"]
    assert list(dict.fromkeys(phases)) == [
        "finding instance",
        "waiting for boot",
        "waiting for ollama",
        "pulling model",
    ]
    assert "create_instance" not in runner.names()
    assert "start_instance" not in runner.names()
    assert catalog.version == "0.9.0"


def test_labels_filter_sent_and_rechecked():
    stranger = dict(instance("running"), labels={"managed-by": "someone-else"})
    clock, runner, provisioner, _ = make_provisioner(
        {
            "list_instances": [{"instances": [stranger]}],
            "list_templates": [{"templates": []}],
        },
        Ollama(0, 0),
    )
    _, results = run(clock, provisioner, seconds=2)

    name, arguments = runner.calls[0]
    assert name == "list_instances"
    assert arguments == {"labels": "exoproxy-name=exoproxy,managed-by=exoproxy"}
    # The stranger is ignored, so a create is attempted and fails on the template.
    assert isinstance(results[0].value, LookupError)


def test_stopped_instance_started_and_address_reread():
    clock, runner, provisioner, _ = make_provisioner(
        {
            "list_instances": [{"instances": [instance("stopped", "127.0.0.5")]}],
            "start_instance": [operation("pending")],
            "get_operation": [operation("pending"), operation("success")],
            "get_instance": [
                instance("starting", ""),
                instance("running", "127.0.0.6"),
            ],
        },
        Ollama(0, 0),
    )
    phases, results = run(clock, provisioner)

    assert results[0].url == "http://127.0.0.6:11435"
    assert "starting instance" in phases
    assert runner.names().count("get_operation") == 2


def test_no_instance_creates_one():
    clock, runner, provisioner, _ = make_provisioner(
        {
            "list_instances": [{"instances": []}],
            "list_templates": [
                {
                    "templates": [
                        {
                            "id": "t-old",
                            "name": "Linux Ubuntu 24.04 LTS 64-bit",
                            "created-at": "2024-01-01T00:00:00Z",
                        },
                        {
                            "id": "t-new",
                            "name": "Linux Ubuntu 24.04 LTS 64-bit",
                            "created-at": "2025-01-01T00:00:00Z",
                        },
                    ]
                }
            ],
            "list_instance_types": [
                {
                    "instance-types": [
                        {"id": "type-1", "family": "gpua5000", "size": "small"}
                    ]
                }
            ],
            "list_security_groups": [{"security-groups": []}],
            "create_security_group": [operation("success", "sg-1")],
            "add_rule_to_security_group": [operation("success", "sg-1")],
            "create_instance": [operation("pending")],
            "get_operation": [operation("success")],
            "get_instance": [instance("running")],
        },
        Ollama(0, 0),
    )
    phases, results = run(clock, provisioner)

    assert results[0].url == "http://127.0.0.9:11435"
    assert "creating instance" in phases
    created = dict(runner.calls)["create_instance"]
    assert created["template"] == {"id": "t-new"}
    assert created["instance_type"] == {"id": "type-1"}
    assert created["security_groups"] == [{"id": "sg-1"}]
    assert created["labels"] == {"managed-by": "exoproxy", "exoproxy-name": "exoproxy"}
    assert created["disk_size"] == 50
    rule = dict(runner.calls)["add_rule_to_security_group"]
    assert rule["network"] == "127.0.0.0/8"
    assert rule["start_port"] == rule["end_port"] == 11435
    assert runner.names().count("create_instance") == 1


def test_instance_in_error_fails_run():
    clock, _, provisioner, _ = make_provisioner(
        {
            "list_instances": [{"instances": [instance("running")]}],
            "get_instance": [instance("error")],
        },
        Ollama(0, 0),
    )
    _, results = run(clock, provisioner)
    assert "state error" in str(results[0].value)


def test_ready_timeout_fails_run():
    config = make_config(ready_timeout="30")
    clock, _, provisioner, _ = make_provisioner(
        {
            "list_instances": [{"instances": [instance("running")]}],
            "get_instance": [instance("running")],
        },
        Ollama(down_polls=10_000, pulling_polls=0),
        config,
    )
    _, results = run(clock, provisioner, seconds=40)
    assert "not ready within 30 s" in str(results[0].value)


def test_failed_operation_fails_run():
    clock, _, provisioner, _ = make_provisioner(
        {
            "list_instances": [{"instances": [instance("stopped")]}],
            "start_instance": [operation("pending")],
            "get_operation": [dict(operation("failure"), reason="unavailable")],
        },
        Ollama(0, 0),
    )
    _, results = run(clock, provisioner)
    assert "failure: unavailable" in str(results[0].value)


def test_shut_down_stops_and_waits():
    clock, runner, provisioner, _ = make_provisioner(
        {
            "stop_instance": [operation("success")],
            "get_instance": [instance("stopping"), instance("stopped")],
        },
        Ollama(0, 0),
    )
    results: list[Any] = []
    provisioner.shut_down("i-1").addBoth(results.append)
    for _ in range(5):
        clock.advance(1)
    assert results == [None]
    assert provisioner.instance_state == "stopped"
    assert runner.names()[0] == "stop_instance"


def test_model_names_accept_latest_tag():
    tags = {"models": [{"name": "llama3:latest", "model": "llama3:latest"}]}
    assert "llama3" in model_names(tags)
    assert "llama3:latest" in model_names(tags)
