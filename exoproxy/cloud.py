"""
Exoscale API calls for the reactor: every SDK call runs in a thread pool that the
daemon owns, with a timeout, and asynchronous operations are polled on the clock.
"""

from __future__ import annotations

from typing import Any, Callable

from exoscale.api.v2 import Client
from requests.adapters import HTTPAdapter
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

MANAGED_BY_LABEL = "managed-by"
MANAGED_BY_VALUE = "exoproxy"


class OperationFailed(Exception):
    """
    An asynchronous Exoscale operation ended in a state other than success.
    """


class _TimeoutAdapter(HTTPAdapter):
    """
    A requests adapter that applies a timeout to every request.

    The exoscale SDK (0.16) sends its requests without a timeout, so a hung API
    endpoint would hold a thread forever.
    """

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def send(self, request: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().send(request, **kwargs)


def labels_filter(labels: dict[str, str]) -> str:
    """
    Format labels for the `labels` query parameter of list-instances.
    """
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def has_labels(resource: dict[str, Any], labels: dict[str, str]) -> bool:
    found = resource.get("labels") or {}
    return all(found.get(key) == value for key, value in labels.items())


class ExoscaleCloud:
    """
    The Exoscale API of one zone, called through the official SDK.

    Every method returns a Deferred and never blocks the reactor. The thread pool
    starts with L{start} and must be stopped with L{stop}.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        clock: IReactorTime,
        *,
        api_url: str,
        api_key: str,
        api_secret: str,
        timeout: float,
        max_threads: int,
        poll_interval: float,
        client_factory: Callable[..., Client] = Client,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """
        Args:
            run_in_thread: runs a blocking callable with its arguments and returns
                a Deferred of its result; by default, in this object's own pool.
                Tests pass a runner that they control.
        """
        self._reactor = reactor
        self._clock = clock
        self._timeout = timeout
        self._poll_interval = poll_interval
        self.api_url = api_url

        self._client = client_factory(api_key, api_secret, url=api_url)
        adapter = _TimeoutAdapter(timeout)
        self._client.http_client.mount("http://", adapter)
        self._client.http_client.mount("https://", adapter)

        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="exoscale")
        if run_in_thread is None:

            def run_in_thread(function, *args, **kwargs):
                return deferToThreadPool(
                    self._reactor, self._pool, function, *args, **kwargs
                )

        self._run_in_thread = run_in_thread

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        """
        Stop the thread pool, waiting for the calls in progress to end. Each of them
        ends within the API timeout.
        """
        self._pool.stop()

    def call(self, operation: str, **arguments: Any) -> Deferred[Any]:
        """
        Call one SDK method, such as "list_instances", in the thread pool.

        The Deferred fails with the SDK's exception, or with
        C{twisted.internet.defer.TimeoutError} if the call outlives the API timeout
        by more than a second.
        """
        method = getattr(self._client, operation)
        log.debug("Calling Exoscale {operation}", operation=operation)
        called = self._run_in_thread(method, **arguments)
        return called.addTimeout(self._timeout + 1, self._clock)

    @inlineCallbacks
    def wait_for_operation(self, operation: dict[str, Any]):
        """
        Poll an operation until it succeeds, and return its final form.

        Raises:
            OperationFailed: the operation ended in failure or timeout.
        """
        result: dict[str, Any] = operation

        def poll() -> Deferred[None]:
            def check(current: dict[str, Any]) -> None:
                nonlocal result
                result = current
                if current.get("state") != "pending":
                    loop.stop()

            return self.call("get_operation", id=operation["id"]).addCallback(check)

        if operation.get("state") == "pending":
            loop = LoopingCall(poll)
            loop.clock = self._clock
            yield loop.start(self._poll_interval, now=False)

        if result.get("state") != "success":
            reason = result.get("reason", "no reason given")
            raise OperationFailed(
                f"Exoscale operation {operation['id']} ended in "
                f"{result.get('state')}: {reason}"
            )
        return result

    @inlineCallbacks
    def wait_for_instance_state(self, instance_id: str, states: set[str]):
        """
        Poll an instance until its state is one of C{states}, and return it.
        """
        instance: dict[str, Any] = {}

        def poll() -> Deferred[None]:
            def check(current: dict[str, Any]) -> None:
                nonlocal instance
                instance = current
                if current.get("state") in states:
                    loop.stop()

            return self.call("get_instance", id=instance_id).addCallback(check)

        loop = LoopingCall(poll)
        loop.clock = self._clock
        yield loop.start(self._poll_interval, now=True)
        return instance

    @inlineCallbacks
    def list_managed_instances(self, labels: dict[str, str]):
        """
        Return the instances that carry all of C{labels}.

        The labels are checked again here, so that an API that ignored the filter
        could never make exoproxy act on somebody else's instance.
        """
        found = yield self.call("list_instances", labels=labels_filter(labels))
        return [
            instance
            for instance in found.get("instances", [])
            if has_labels(instance, labels)
        ]

    @inlineCallbacks
    def find_template_id(self, name: str):
        """
        Return the id of the public template with this name.

        Raises:
            LookupError: no public template has that name.
        """
        found = yield self.call("list_templates", visibility="public")
        matches = [t for t in found.get("templates", []) if t.get("name") == name]
        if not matches:
            raise LookupError(f"no public template is named {name!r} in this zone")
        # Exoscale keeps older builds under the same name; the newest comes last.
        matches.sort(key=lambda template: template.get("created-at", ""))
        return matches[-1]["id"]

    @inlineCallbacks
    def find_instance_type_id(self, family: str, size: str):
        """
        Return the id of the instance type FAMILY.SIZE.

        Raises:
            LookupError: the zone has no such instance type.
        """
        found = yield self.call("list_instance_types")
        for instance_type in found.get("instance-types", []):
            if (instance_type.get("family"), instance_type.get("size")) == (
                family,
                size,
            ):
                return instance_type["id"]
        raise LookupError(f"the zone offers no instance type {family}.{size}")

    @inlineCallbacks
    def ensure_security_group(self, name: str, port: int, networks: tuple[str, ...]):
        """
        Return the id of the security group with this name, creating it with one
        TCP ingress rule on C{port} for each network when it does not exist.
        """
        found = yield self.call("list_security_groups")
        for group in found.get("security-groups", []):
            if group.get("name") == name:
                return group["id"]

        operation = yield self.call(
            "create_security_group",
            name=name,
            description="Ollama backend of exoproxy",
        )
        operation = yield self.wait_for_operation(operation)
        group_id = operation["reference"]["id"]
        log.info(
            "Created security group {group_id} named {name}",
            group_id=group_id,
            name=name,
        )

        for network in networks:
            operation = yield self.call(
                "add_rule_to_security_group",
                id=group_id,
                flow_direction="ingress",
                protocol="tcp",
                network=network,
                start_port=port,
                end_port=port,
                description="Ollama for exoproxy",
            )
            yield self.wait_for_operation(operation)
        return group_id
