"""
The steps that bring the managed instance up and shut it down again.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from exoproxy.catalog import BackendCatalog
from exoproxy.cloud import MANAGED_BY_LABEL, MANAGED_BY_VALUE, ExoscaleCloud
from exoproxy.config import Config
from exoproxy.lifecycle import Backend
from exoproxy.userdata import UserDataSettings, encode_user_data, render_user_data

log = Logger()

# The instance states in which a start or a wait makes progress, by priority when
# several labelled instances exist.
_STATE_PRIORITY = ("running", "starting", "stopping", "stopped")
_FAILED_STATES = {"error", "destroying", "destroyed", "expunging"}


class ReadyTimeout(Exception):
    """
    The provisioning run did not end within the ready timeout.
    """


class InstanceFailed(Exception):
    """
    The instance went into a state from which it cannot serve.
    """


def model_names(tags: dict[str, Any]) -> set[str]:
    """
    Return the names in an `/api/tags` answer, with and without an implied
    ":latest" tag, because Ollama lists "llama3" as "llama3:latest".
    """
    names = set()
    for model in tags.get("models", []):
        for key in ("name", "model"):
            name = model.get(key)
            if name:
                names.add(name)
                if name.endswith(":latest"):
                    names.add(name.removesuffix(":latest"))
    return names


def json_fetcher(
    agent: IAgent, clock: IReactorTime, timeout: float
) -> Callable[[str], Deferred[Any]]:
    """
    Return a function that GETs a URL and parses its JSON body, within C{timeout}.
    """
    client = HTTPClient(agent)

    @inlineCallbacks
    def fetch(url: str):
        requested = client.get(url, headers={"Accept": "application/json"})
        response = yield requested.addTimeout(timeout, clock)
        body = yield treq.content(response).addTimeout(timeout, clock)
        if response.code != 200:
            raise ValueError(f"{url} answered HTTP {response.code}")
        return json.loads(body)

    return fetch


class ExoscaleProvisioner:
    """
    Bring one labelled Exoscale instance to the point where its Ollama serves the
    configured model, and stop or destroy it when it is idle.
    """

    def __init__(
        self,
        cloud: ExoscaleCloud,
        clock: IReactorTime,
        config: Config,
        fetch_json: Callable[[str], Deferred[Any]],
        catalog: BackendCatalog,
    ) -> None:
        self._cloud = cloud
        self._clock = clock
        self._config = config
        self._fetch_json = fetch_json
        self._catalog = catalog
        self._instance_id: str | None = None
        self.instance_state: str | None = None
        self.labels = {
            MANAGED_BY_LABEL: MANAGED_BY_VALUE,
            "exoproxy-name": config.instance_name,
        }

    def known_instance_id(self) -> str | None:
        return self._instance_id

    def bring_up(self, set_phase: Callable[[str], None]) -> Deferred[Backend]:
        """
        Start a provisioning run, which fails after the ready timeout.
        """
        run = self._bring_up(set_phase)
        return run.addTimeout(
            self._config.ready_timeout, self._clock, self._explain_deadline
        )

    def _explain_deadline(self, result: object, timeout: float) -> object:
        raise ReadyTimeout(
            f"the instance was not ready within {timeout:.0f} s (--ready-timeout)"
        )

    @inlineCallbacks
    def _bring_up(self, set_phase: Callable[[str], None]):
        set_phase("finding instance")
        instances = yield self._cloud.list_managed_instances(self.labels)
        instance = self._choose(instances)

        if instance is None:
            instance_id = yield self._create(set_phase)
        else:
            instance_id = instance["id"]
            self._instance_id = instance_id
            self.instance_state = instance.get("state")
            log.info(
                "Found instance {instance_id} in state {state}",
                instance_id=instance_id,
                state=self.instance_state,
            )
            if self.instance_state == "stopping":
                set_phase("waiting for the instance to stop")
                yield self._wait_for_state(instance_id, {"stopped"})
            if self.instance_state == "stopped":
                set_phase("starting instance")
                operation = yield self._cloud.call("start_instance", id=instance_id)
                yield self._cloud.wait_for_operation(operation)

        set_phase("waiting for boot")
        instance = yield self._wait_for_state(instance_id, {"running"})

        # The address can change across a stop and a start, so it is read again on
        # every run. The API names the field "public-ip".
        address = instance.get("public-ip")
        if not address:
            raise InstanceFailed(f"instance {instance_id} has no public-ip")
        url = f"http://{address}:{self._config.backend_port}"

        yield self._wait_for_ollama(url, set_phase)
        return Backend(url=url, instance_id=instance_id)

    def _choose(self, instances: list[dict[str, Any]]) -> dict[str, Any] | None:
        usable = [i for i in instances if i.get("state") in _STATE_PRIORITY]
        usable.sort(key=lambda i: _STATE_PRIORITY.index(i["state"]))
        if len(usable) > 1:
            # NOTE: the extra instances are left alone, and only logged, so that
            # nothing is stopped by mistake; an operator has to remove them.
            log.warn(
                "Found {count} instances labelled {labels}; using {instance_id}",
                count=len(usable),
                labels=self.labels,
                instance_id=usable[0]["id"],
            )
        return usable[0] if usable else None

    @inlineCallbacks
    def _create(self, set_phase: Callable[[str], None]):
        set_phase("creating instance")
        config = self._config
        template_id = yield self._cloud.find_template_id(config.template)
        type_id = yield self._cloud.find_instance_type_id(
            config.instance_type.family, config.instance_type.size
        )
        group_id = yield self._cloud.ensure_security_group(
            config.instance_name, config.backend_port, config.allowed_networks
        )
        user_data = render_user_data(
            UserDataSettings(
                ollama_port=config.backend_port,
                models=(config.model,),
                gpu=config.instance_type.gpu,
            )
        )

        operation = yield self._cloud.call(
            "create_instance",
            name=config.instance_name,
            instance_type={"id": type_id},
            template={"id": template_id},
            disk_size=config.disk_size,
            labels=self.labels,
            security_groups=[{"id": group_id}],
            user_data=encode_user_data(user_data),
            public_ip_assignment="inet4",
        )
        operation = yield self._cloud.wait_for_operation(operation)
        instance_id = operation["reference"]["id"]
        self._instance_id = instance_id
        log.info(
            "Created instance {instance_id} ({instance_type}, template {template})",
            instance_id=instance_id,
            instance_type=str(config.instance_type),
            template=config.template,
        )
        return instance_id

    @inlineCallbacks
    def _wait_for_state(self, instance_id: str, states: set[str]):
        instance = yield self._cloud.wait_for_instance_state(
            instance_id, states | _FAILED_STATES
        )
        self.instance_state = instance.get("state")
        if self.instance_state in _FAILED_STATES:
            raise InstanceFailed(
                f"instance {instance_id} is in state {self.instance_state}"
            )
        return instance

    @inlineCallbacks
    def _wait_for_ollama(self, url: str, set_phase: Callable[[str], None]):
        """
        Poll Ollama until it answers /api/version and /api/tags lists the model.
        """
        set_phase("waiting for ollama")
        while True:
            try:
                version = yield self._fetch_json(f"{url}/api/version")
                tags = yield self._fetch_json(f"{url}/api/tags")
            except Exception as error:
                log.debug(
                    "Ollama at {url} is not up yet: {error}", url=url, error=error
                )
            else:
                if self._config.model in model_names(tags):
                    self._catalog.record(version, tags)
                    return
                set_phase("pulling model")
            yield deferLater(self._clock, self._config.poll_interval, lambda: None)

    @inlineCallbacks
    def shut_down(self, instance_id: str):
        """
        Stop or destroy the instance, as the idle action says, and wait until that
        has happened.
        """
        if self._config.idle_action == "destroy":
            operation = yield self._cloud.call("delete_instance", id=instance_id)
            yield self._cloud.wait_for_operation(operation)
            self._instance_id = None
            self.instance_state = "destroyed"
            log.info("Destroyed instance {instance_id}", instance_id=instance_id)
            return

        operation = yield self._cloud.call("stop_instance", id=instance_id)
        yield self._cloud.wait_for_operation(operation)
        yield self._wait_for_state(instance_id, {"stopped"})
        log.info("Stopped instance {instance_id}", instance_id=instance_id)
