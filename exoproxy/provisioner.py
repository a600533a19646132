"""
The steps that bring the managed instance up and shut it down again.

A run finds the instance by its labels, starts it or creates it, and waits until its
Ollama serves the model. When several labelled instances exist, the run keeps one and
retires the others. A run whose instance cannot become ready (the ready timeout, an
instance in error or without a public IP) ends with the cleanup that
--on-ready-timeout selects.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from exoproxy.api_errors import ApiCallFailed
from exoproxy.backend_tls import SERVICE_NAME, BackendKeyring
from exoproxy.catalog import BackendCatalog
from exoproxy.cloud import (
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    ExoscaleCloud,
    InstanceGone,
)
from exoproxy.config import Config
from exoproxy.instance_actions import (
    ACTIVE_STATES,
    GONE_STATES,
    InstanceActions,
)
from exoproxy.lifecycle import Backend
from exoproxy.userdata import (
    TerminatorSettings,
    UserDataSettings,
    encode_user_data,
    render_user_data,
)

log = Logger()

# The instance states in which a start or a wait makes progress, by priority when
# several labelled instances exist.
_STATE_PRIORITY = ("running", "starting", "stopping", "stopped")
_FAILED_STATES = {"error", "destroying", "destroyed", "expunging"}

# How often a run looks for its instance again when it disappears while the run
# waits for it, before the run fails.
_MAX_DISAPPEARANCES = 3

# While Ollama is not up, every this many polls the instance is read again, so
# that an instance that was deleted or lost its address ends the wait early.
_POLLS_PER_INSTANCE_CHECK = 10

# The address of Ollama on the instance, behind the TLS terminator.
_OLLAMA_LOOPBACK_HOST = "127.0.0.1"
_OLLAMA_LOOPBACK_PORT = 11434
_SSH_PORT = 22


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
    Return the names in an `/api/tags` response, with and without an implied
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


def choose_instance(
    instances: list[dict[str, Any]], preferred_id: str | None = None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """
    Return the labelled instance to use and the other usable ones.

    The one to use is the most advanced by state (running, starting, stopping,
    stopped), then the one this daemon used before, then the oldest. Instances in
    error or being deleted are neither used nor returned.
    """

    def rank(instance: dict[str, Any]) -> tuple[int, bool, str, str]:
        return (
            _STATE_PRIORITY.index(instance["state"]),
            instance.get("id") != preferred_id,
            instance.get("created-at", ""),
            instance.get("id", ""),
        )

    usable = sorted(
        (i for i in instances if i.get("state") in _STATE_PRIORITY), key=rank
    )
    if not usable:
        return None, []
    return usable[0], usable[1:]


def json_fetcher(
    agent: IAgent, clock: IReactorTime, timeout: float
) -> Callable[[str], Deferred[Any]]:
    """
    Return a function that GETs a URL and parses its JSON body, within C{timeout}.
    """
    client = HTTPClient(agent)
    rejected_urls: set[str] = set()

    @inlineCallbacks
    def fetch(url: str):
        requested = client.get(url, headers={"Accept": "application/json"})
        response = yield requested.addTimeout(timeout, clock)
        body = yield treq.content(response).addTimeout(timeout, clock)
        if response.code in (401, 403) and url not in rejected_urls:
            # Readiness polls log their failures at debug level, and this one does
            # not go away by waiting.
            rejected_urls.add(url)
            log.error(
                "The backend at {url} rejected exoproxy's bearer secret with HTTP "
                "{code}, so it was not set up with the key material that exoproxy "
                "has for it",
                url=url,
                code=response.code,
            )
        if response.code != 200:
            raise ValueError(f"{url} returned HTTP {response.code}")
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
        *,
        keyring: BackendKeyring | None = None,
    ) -> None:
        """
        Args:
            keyring: the key material of the instance. New instances then get a
                TLS terminator in front of Ollama, and every instance is reached
                over verified HTTPS with its bearer secret. Without it the
                instance's Ollama is public and reached over plain HTTP, which only
                unit tests with a scripted Ollama use.
        """
        self._cloud = cloud
        self._clock = clock
        self._config = config
        self._fetch_json = fetch_json
        self._catalog = catalog
        self._keyring = keyring
        self._actions = InstanceActions(cloud, clock)
        self._instance_id: str | None = None
        self.instance_state: str | None = None
        # The instance that --on-ready-timeout keep left for inspection.
        self.kept_instance_id: str | None = None
        self._retiring: dict[str, Deferred[str]] = {}
        self._deleted: set[str] = set()
        # Increased when a run starts or is abandoned, so that the polls of an
        # abandoned run stop.
        self._generation = 0
        # Labelled instances that exoproxy leaves alone, by id, with the reason;
        # `/status` lists them, because an operator has to act on them.
        self.needs_attention: dict[str, str] = {}
        self.labels = {
            MANAGED_BY_LABEL: MANAGED_BY_VALUE,
            "exoproxy-name": config.instance_name,
        }

    def known_instance_id(self) -> str | None:
        return self._instance_id

    def may_be_running(self, instance_id: str) -> bool:
        """
        Return whether the instance may still run and so needs a stop when idle:
        false once it is known to be stopped or gone, or when --on-ready-timeout
        keep left it for inspection.
        """
        if instance_id == self.kept_instance_id or instance_id in self._deleted:
            return False
        if instance_id == self._instance_id:
            return self.instance_state not in ("stopped", "destroyed")
        return True

    def bring_up(
        self,
        set_phase: Callable[[str], None],
        needed: Callable[[], bool] | None = None,
        previous: Backend | None = None,
    ) -> Deferred[Backend | None]:
        """
        Start a provisioning run, which fails after the ready timeout.

        A run that fails with L{ReadyTimeout} or L{InstanceFailed} applies
        --on-ready-timeout to the labelled instances before it fails.

        Args:
            needed: returns whether a request needs the instance. While it returns
                false, the run only adopts a running or starting instance, and
                fires with None when there is none. None means always.
            previous: the backend that served until now. When it still responds
                and lists the model, the run fires with it and makes no API call.
        """
        self.kept_instance_id = None
        self._generation += 1
        running = self._bring_up(set_phase, needed or (lambda: True), previous)
        run = self._with_deadline(running, self._config.ready_timeout)
        run.addErrback(self._clean_up_failed_run, set_phase)
        return run

    def _with_deadline(
        self, running: Deferred[Backend | None], timeout: float
    ) -> Deferred[Backend | None]:
        """
        Return a Deferred with the result of C{running}, which fails with
        L{ReadyTimeout} after C{timeout} seconds whatever C{running} does.

        C{running} is cancelled then, and so are its readiness polls at their
        next step, even where a cancelled connection attempt looked like one more
        failed poll; that is why this is not C{Deferred.addTimeout}.
        """
        expired = False

        def abandon(_: object = None) -> None:
            self._generation += 1
            running.cancel()

        result: Deferred[Backend | None] = Deferred(abandon)

        def expire() -> None:
            nonlocal expired
            expired = True
            abandon()
            if not result.called:
                result.errback(
                    ReadyTimeout(
                        f"the instance was not ready within {timeout:.0f} s "
                        "(--ready-timeout)"
                    )
                )

        timer = self._clock.callLater(timeout, expire)

        def finished(outcome: object) -> None:
            if timer.active():
                timer.cancel()
            if expired or result.called:
                return None
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
            return None

        running.addBoth(finished)
        return result

    @inlineCallbacks
    def _bring_up(
        self,
        set_phase: Callable[[str], None],
        needed: Callable[[], bool],
        previous: Backend | None,
    ):
        if previous is not None:
            set_phase("checking the backend")
            answers = yield self._backend_answers(previous.url)
            if answers:
                log.info(
                    "Ollama of instance {instance_id} responds at {url}",
                    instance_id=previous.instance_id,
                    url=previous.url,
                )
                return previous
            log.warn(
                "Ollama of instance {instance_id} does not respond at {url}; "
                "reading the instance from the API",
                instance_id=previous.instance_id,
                url=previous.url,
            )

        for _ in range(_MAX_DISAPPEARANCES):
            set_phase("finding instance")
            instance = yield self._find_instance()
            try:
                backend = yield self._bring_found_up(instance, set_phase, needed)
            except InstanceGone as gone:
                log.warn(
                    "Instance {instance_id} no longer exists; looking for the "
                    "instance again",
                    instance_id=gone.instance_id,
                )
                self._forget_instance()
                continue
            return backend
        raise InstanceFailed(
            f"the instance disappeared {_MAX_DISAPPEARANCES} times while it was "
            "being brought up"
        )

    @inlineCallbacks
    def _bring_found_up(
        self,
        instance: dict[str, Any] | None,
        set_phase: Callable[[str], None],
        needed: Callable[[], bool],
    ):
        if instance is None:
            self._forget_instance()
            if not needed():
                return None
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
            if self.instance_state not in ACTIVE_STATES and not needed():
                return None
            if self.instance_state == "stopping":
                set_phase("waiting for the instance to stop")
                yield self._wait_for_state(instance_id, {"stopped"})
            if self.instance_state == "stopped":
                set_phase("starting instance")
                yield self._start(instance_id)

        set_phase("waiting for boot")
        instance = yield self._wait_for_state(instance_id, {"running"})

        # The address can change across a stop and a start, so it is read again on
        # every run. The API names the field "public-ip".
        address = instance.get("public-ip")
        if not address:
            raise InstanceFailed(f"instance {instance_id} has no public-ip")
        url = self._backend_url(instance_id, address)

        yield self._wait_for_ollama(url, set_phase, instance_id)
        return Backend(url=url, instance_id=instance_id)

    @inlineCallbacks
    def _start(self, instance_id: str):
        """
        Start the stopped instance. A start that the instance's state rejects
        (409) means that another client changed it; the instance is started
        again once it has settled as stopped.
        """
        for _ in range(_MAX_DISAPPEARANCES):
            try:
                operation = yield self._cloud.call("start_instance", id=instance_id)
            except ApiCallFailed as error:
                if error.status == 404:
                    raise InstanceGone(instance_id) from None
                if error.status != 409:
                    raise
                log.info(
                    "Instance {instance_id} rejected the start ({error}); waiting "
                    "for it to settle",
                    instance_id=instance_id,
                    error=error.detail,
                )
                instance = yield self._wait_for_state(
                    instance_id, {"running", "stopped"}
                )
                if instance.get("state") == "running":
                    return
                continue
            yield self._cloud.wait_for_operation(operation)
            return

    @inlineCallbacks
    def _find_instance(self):
        """
        List the labelled instances, retire the extra ones, and return the one to
        use, or None.
        """
        instances = yield self._cloud.list_managed_instances(self.labels)
        listed = {instance.get("id") for instance in instances}
        for instance_id in list(self.needs_attention):
            if instance_id not in listed:
                del self.needs_attention[instance_id]
        for instance in instances:
            instance_id = instance.get("id")
            if instance.get("state") == "error":
                self._needs_attention(
                    instance_id,
                    "in state error; exoproxy does not use it, so inspect it or "
                    "delete it",
                )
        keeper, extras = choose_instance(instances, self._instance_id)
        if keeper is not None:
            self._retire(extras, keeper["id"])
        return keeper

    def _retire(self, extras: list[dict[str, Any]], keeper_id: str) -> None:
        """
        Stop (or delete, with --idle-action destroy) the extra labelled instances,
        in the background, so that only one runs.
        """
        action = self._config.idle_action
        for instance in extras:
            instance_id, state = instance["id"], instance.get("state")
            if instance_id in self._retiring:
                continue
            if state not in ACTIVE_STATES and action != "destroy":
                self._needs_attention(
                    instance_id,
                    f"an extra instance in state {state}; exoproxy uses "
                    f"{keeper_id} and leaves this one alone, so delete it",
                )
                continue

            log.warn(
                "Instance {instance_id} is an extra instance labelled {labels}, in "
                "state {state}; exoproxy keeps using {keeper_id} and applies "
                "{action} to it",
                instance_id=instance_id,
                labels=self.labels,
                state=state,
                keeper_id=keeper_id,
                action=action,
            )
            retiring = self._actions.apply(
                action, instance_id, self._config.stop_timeout
            )
            self._retiring[instance_id] = retiring
            retiring.addBoth(self._retired, instance_id, action)

    def _needs_attention(self, instance_id: str, reason: str) -> None:
        """
        Record and log, once, a labelled instance that exoproxy leaves alone.
        """
        if self.needs_attention.get(instance_id) == reason:
            return
        self.needs_attention[instance_id] = reason
        log.warn(
            "Instance {instance_id} labelled {labels} is {reason}",
            instance_id=instance_id,
            labels=self.labels,
            reason=reason,
        )

    def _retired(self, result: str | Failure, instance_id: str, action: str) -> None:
        self._retiring.pop(instance_id, None)
        if isinstance(result, Failure):
            log.error(
                "Applying {action} to the extra instance {instance_id} failed: "
                "{error}",
                action=action,
                instance_id=instance_id,
                error=result.getErrorMessage(),
            )
            return
        log.info(
            "The extra instance {instance_id} is {result}",
            instance_id=instance_id,
            result=result,
        )

    def _forget_instance(self) -> None:
        self._instance_id = None
        self.instance_state = None

    @inlineCallbacks
    def _backend_answers(self, url: str):
        """
        Return whether Ollama at C{url} responds to /api/version and lists the
        model.
        """
        try:
            yield self._fetch_json(f"{url}/api/version")
            tags = yield self._fetch_json(f"{url}/api/tags")
        except (CancelledError, ConnectingCancelledError):
            raise
        except Exception as error:
            log.info("Ollama at {url} does not respond: {error}", url=url, error=error)
            return False
        return self._config.model in model_names(tags)

    def _backend_url(self, instance_id: str, address: str) -> str:
        port = self._config.backend_port
        if self._keyring is None:
            return f"http://{address}:{port}"
        return self._keyring.backend_url(instance_id, address, port)

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
        if config.ssh_networks:
            yield self._sync_ssh_rules(group_id)
        material = None
        if self._keyring is None:
            settings = UserDataSettings(
                ollama_port=config.backend_port,
                models=(config.model,),
                gpu=config.instance_type.gpu,
            )
        else:
            material = self._keyring.new_material()
            settings = UserDataSettings(
                ollama_host=_OLLAMA_LOOPBACK_HOST,
                ollama_port=_OLLAMA_LOOPBACK_PORT,
                models=(config.model,),
                gpu=config.instance_type.gpu,
                terminator=TerminatorSettings(
                    port=config.backend_port,
                    server_name=SERVICE_NAME,
                    certificate_pem=material.certificate_pem,
                    private_key_pem=material.private_key_pem,
                    bearer_token=material.bearer_token,
                ),
            )
        user_data = render_user_data(settings)

        ssh_keys = {"ssh_keys": [{"name": config.ssh_key}]} if config.ssh_key else {}
        operation = yield self._create_instance(
            **ssh_keys,
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
        if material is not None:
            self._keyring.bind(instance_id, material)
        log.info(
            "Created instance {instance_id} ({instance_type}, template {template})",
            instance_id=instance_id,
            instance_type=str(config.instance_type),
            template=config.template,
        )
        return instance_id

    @inlineCallbacks
    def _sync_ssh_rules(self, group_id: str):
        """
        Make the group's SSH ingress rules match --allow-ssh-cidr: add the missing
        networks and delete the others.
        """
        # NOTE: this runs only when an instance is created with --allow-ssh-cidr.
        # Dropping the option later leaves the group's SSH rules open, so they, or
        # the group, must be deleted by hand.
        wanted = set(self._config.ssh_networks)
        group = yield self._cloud.call("get_security_group", id=group_id)
        present = set()
        for rule in group.get("rules", []):
            is_ssh = (
                rule.get("flow-direction") == "ingress"
                and rule.get("protocol") == "tcp"
                and rule.get("start-port") == _SSH_PORT
                and rule.get("end-port") == _SSH_PORT
                and rule.get("network")
            )
            if not is_ssh:
                continue
            if rule["network"] in wanted:
                present.add(rule["network"])
                continue
            operation = yield self._cloud.call(
                "delete_rule_from_security_group", id=group_id, rule_id=rule["id"]
            )
            yield self._cloud.wait_for_operation(operation)
            log.info(
                "Closed SSH from {network} in security group {group_id}",
                network=rule["network"],
                group_id=group_id,
            )

        for network in sorted(wanted - present):
            operation = yield self._cloud.call(
                "add_rule_to_security_group",
                id=group_id,
                flow_direction="ingress",
                protocol="tcp",
                network=network,
                start_port=_SSH_PORT,
                end_port=_SSH_PORT,
                description="SSH for exoproxy (--allow-ssh-cidr)",
            )
            yield self._cloud.wait_for_operation(operation)
            log.info(
                "Opened SSH from {network} in security group {group_id}",
                network=network,
                group_id=group_id,
            )

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
    def _wait_for_ollama(
        self,
        url: str,
        set_phase: Callable[[str], None],
        instance_id: str | None = None,
    ):
        """
        Poll Ollama until it answers /api/version and /api/tags lists the model.

        Every few polls the instance is read again, so that an instance that was
        deleted, stopped or lost its address ends the wait at once.
        """
        set_phase("waiting for ollama")
        generation = self._generation
        polls = 0
        while True:
            try:
                version = yield self._fetch_json(f"{url}/api/version")
                tags = yield self._fetch_json(f"{url}/api/tags")
            except (CancelledError, ConnectingCancelledError):
                raise
            except Exception as error:
                log.debug(
                    "Ollama at {url} is not up yet: {error}", url=url, error=error
                )
            else:
                if self._config.model in model_names(tags):
                    self._catalog.record(version, tags)
                    return
                set_phase("pulling model")
            # A cancelled request can also fail with another error, which the
            # handler above takes for a failed poll, so the run's generation
            # shows whether the run was abandoned.
            if generation != self._generation:
                raise CancelledError()
            polls += 1
            if instance_id is not None and polls % _POLLS_PER_INSTANCE_CHECK == 0:
                yield self._check_instance(instance_id)
            yield deferLater(self._clock, self._config.poll_interval, lambda: None)

    @inlineCallbacks
    def _check_instance(self, instance_id: str):
        """
        Raise unless the instance still runs with a public IP.

        Raises:
            InstanceGone: the API no longer finds the instance (404).
            InstanceFailed: the instance left "running" or lost its public IP.
        """
        instance = yield self._cloud.get_instance(instance_id)
        self.instance_state = instance.get("state")
        if self.instance_state != "running":
            raise InstanceFailed(
                f"instance {instance_id} went to state {self.instance_state} "
                "while exoproxy waited for Ollama"
            )
        if not instance.get("public-ip"):
            raise InstanceFailed(f"instance {instance_id} lost its public-ip")

    @inlineCallbacks
    def _create_instance(self, **arguments: Any):
        """
        Call create-instance and return its operation.

        After a failure that the API may have carried out, the labelled instances
        are listed before the next attempt. An instance found then is the one that
        the failed call created, so it is adopted instead of creating a second
        one, and the operation returned is a finished one that refers to it.
        """
        policy = self._cloud.retry_policy
        for attempt in range(1, policy.attempts + 1):
            try:
                operation = yield self._cloud.call("create_instance", **arguments)
            except ApiCallFailed as error:
                if not (error.maybe_applied and attempt < policy.attempts):
                    raise
                delay = policy.delay(attempt, error.retry_after)
                log.warn(
                    "{operation} may have been carried out although it failed "
                    "({error}); looking for the instance in {delay:.1f} s",
                    operation="create-instance",
                    error=error.detail,
                    delay=delay,
                )
                yield deferLater(self._clock, delay, lambda: None)
                found = yield self._find_instance()
                if found is None:
                    continue
                log.info(
                    "Adopting instance {instance_id}, which the failed "
                    "create-instance made",
                    instance_id=found["id"],
                )
                return {
                    "id": None,
                    "state": "success",
                    "reference": {"id": found["id"]},
                }

            # Recorded before the operation ends, so that a run cancelled now
            # still has the id of the instance to clean up.
            self._instance_id = operation["reference"]["id"]
            return operation
        raise AssertionError("the loop returns or raises on its last attempt")

    @inlineCallbacks
    def _clean_up_failed_run(self, failure: Failure, set_phase: Callable[[str], None]):
        """
        Apply --on-ready-timeout after a run whose instance did not become ready,
        and fail with the reason and what was done.
        """
        if not failure.check(ReadyTimeout, InstanceFailed):
            return failure

        reason = failure.getErrorMessage()
        action = self._config.on_ready_timeout
        if action == "keep":
            self.kept_instance_id = self._instance_id
            if self._instance_id is None:
                return failure
            log.warn(
                "Leaving instance {instance_id} as it is for inspection "
                "(--on-ready-timeout keep) after: {reason}",
                instance_id=self._instance_id,
                reason=reason,
            )
            raise type(failure.value)(
                f"{reason}; instance {self._instance_id} is left as it is for "
                "inspection (--on-ready-timeout keep)"
            )

        set_phase(f"cleaning up after the failed start ({action})")
        # A create or start call whose run gave up at the deadline may still run in
        # its thread, so the labelled instances are listed after it has ended.
        yield self._cloud.drain(self._config.api_timeout + 1)
        try:
            outcomes = yield self.shut_down_all(action)
        except CancelledError:
            raise
        except Exception as error:
            outcomes = [f"listing the instances to {action} failed: {error}"]
        if not outcomes:
            return failure
        raise type(failure.value)(f"{reason}; {'; '.join(outcomes)}")

    @inlineCallbacks
    def shut_down_all(self, action: str):
        """
        Apply C{action} ("stop" or "destroy") to every labelled instance that it
        concerns: the running and starting ones for a stop, all for a destroy.

        Returns:
            A Deferred that fires with one sentence per instance, saying what
            happened to it.
        """
        instances = yield self._cloud.list_managed_instances(self.labels)
        if action == "destroy":
            targets = [i for i in instances if i.get("state") not in GONE_STATES]
        else:
            targets = [i for i in instances if i.get("state") in ACTIVE_STATES]

        outcomes = []
        for instance in targets:
            instance_id = instance["id"]
            try:
                result = yield self._actions.apply(
                    action, instance_id, self._config.stop_timeout
                )
            except CancelledError:
                raise
            except Exception as error:
                log.error(
                    "Applying {action} to instance {instance_id} failed: {error}",
                    action=action,
                    instance_id=instance_id,
                    error=str(error),
                )
                outcomes.append(f"{action} of instance {instance_id} failed: {error}")
                continue
            self._record_shut_down(instance_id, result)
            log.info(
                "Instance {instance_id} is {result} ({action})",
                instance_id=instance_id,
                result=result,
                action=action,
            )
            outcomes.append(f"instance {instance_id} is {result}")
        return outcomes

    @inlineCallbacks
    def shut_down(self, instance_id: str, action: str | None = None):
        """
        Stop or destroy the instance, as C{action} selects (by default the idle
        action), and wait until that has happened, within --stop-timeout.
        """
        action = action or self._config.idle_action
        result = yield self._actions.apply(
            action, instance_id, self._config.stop_timeout
        )
        self._record_shut_down(instance_id, result)
        if result == "gone":
            log.info("Instance {instance_id} is deleted", instance_id=instance_id)
        else:
            log.info("Stopped instance {instance_id}", instance_id=instance_id)

    def _record_shut_down(self, instance_id: str, result: str) -> None:
        if result == "gone":
            self._deleted.add(instance_id)
        if self._instance_id not in (None, instance_id):
            return
        if result == "gone":
            self._instance_id = None
            self.instance_state = "destroyed"
        else:
            self.instance_state = result

    def cancel_background(self) -> None:
        """
        Cancel the retirement of extra instances that is still in progress.
        """
        for retiring in list(self._retiring.values()):
            retiring.cancel()
