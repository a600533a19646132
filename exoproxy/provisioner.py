"""
The steps that bring the managed instance up and shut it down again.

A run finds the instance by its labels, starts it or creates it, and waits until its
Ollama serves the model. When several labelled instances exist, the run keeps one and
retires the others. A run whose instance cannot become ready (the ready timeout, an
instance in error or without a public IP) ends with the cleanup that
--on-ready-timeout selects.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from exoproxy.api_errors import ApiCallFailed
from exoproxy.backend_tls import BackendKeyring
from exoproxy.catalog import BackendCatalog
from exoproxy.cloud import (
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    ExoscaleCloud,
    InstanceGone,
)
from exoproxy.config import Config
from exoproxy.instance_actions import ACTIVE_STATES, InstanceActions
from exoproxy.instance_creation import InstanceCreation
from exoproxy.instance_search import InstanceSearch
from exoproxy.instance_shutdown import InstanceShutdown
from exoproxy.lifecycle_interfaces import Backend
from exoproxy.ollama_readiness import OllamaReadiness
from exoproxy.ssh_rules import SshRules

log = Logger()

_FAILED_STATES = {"error", "destroying", "destroyed", "expunging"}

# How often a run looks for its instance again when it disappears while the run
# waits for it, before the run fails.
_MAX_DISAPPEARANCES = 3


class ReadyTimeout(Exception):
    """
    The provisioning run did not end within the ready timeout.
    """


class InstanceFailed(Exception):
    """
    The instance went into a state from which it cannot serve.
    """


class ExoscaleProvisioner(
    InstanceSearch, InstanceCreation, SshRules, OllamaReadiness, InstanceShutdown
):
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

    def _forget_instance(self) -> None:
        self._instance_id = None
        self.instance_state = None

    def _backend_url(self, instance_id: str, address: str) -> str:
        port = self._config.backend_port
        if self._keyring is None:
            return f"http://{address}:{port}"
        return self._keyring.backend_url(instance_id, address, port)

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
