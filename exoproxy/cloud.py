"""
Exoscale API calls for the reactor: every SDK call runs in a thread pool that the
daemon owns, with a timeout, transient failures are retried with backoff, and
asynchronous operations are polled on the clock.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import attrs
from exoscale.api.v2 import Client
from requests.adapters import HTTPAdapter
from requests.exceptions import Timeout
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from exoproxy.api_errors import ApiCallFailed, api_name, describe_failure
from exoproxy.retry import RetryPolicy

log = Logger()

MANAGED_BY_LABEL = "managed-by"
MANAGED_BY_VALUE = "exoproxy"


# SDK calls that create something. A retry after a failure that the API may have
# carried out could create a duplicate, so such a failure goes to the caller, which
# looks for the result before it tries again.
CREATING_OPERATIONS = frozenset({"create_instance", "create_security_group"})


class OperationFailed(Exception):
    """
    An asynchronous Exoscale operation ended in a state other than success.
    """


class OperationTimedOut(OperationFailed):
    """
    An asynchronous Exoscale operation was still pending when the wait for it
    ended.
    """


class InstanceGone(LookupError):
    """
    The API does not know the instance (404): it was deleted.
    """

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id} no longer exists")
        self.instance_id = instance_id


@attrs.frozen
class PendingRetry:
    """
    An SDK call that failed and waits for its next attempt.

    Attributes:
        operation: the API's name of the call, such as "create-instance".
        attempt: the number of the attempt that failed.
        due: the clock time of the next attempt.
        error: why the attempt failed.
    """

    operation: str
    attempt: int
    due: float
    error: str


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
    starts with L{start} and must be stopped with L{stop}, after L{drain}.
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
        on_call_ended: Callable[[str, str], None] = lambda operation, result: None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        """
        Args:
            max_threads: the size of the thread pool, which bounds the SDK calls
                that run at once; the others wait in the pool's queue.
            run_in_thread: runs a blocking callable with its arguments and returns
                a Deferred of its result; by default, in this object's own pool.
                Tests pass a runner that they control.
            retry_policy: how transient failures of a call are retried; by
                default, 5 attempts from 1 s to 30 s apart.
            on_call_ended: called in the reactor thread with the operation and
                the result ("success", "error", "timeout" or "cancelled") of
                each call, for the metrics.
        """
        self._on_call_ended = on_call_ended
        self._reactor = reactor
        self._clock = clock
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._retry_policy = retry_policy or RetryPolicy()
        self._secrets = (api_secret,)
        self._in_flight: set[Deferred[Any]] = set()
        self._drained: list[Deferred[None]] = []
        self._pending_retries: dict[object, PendingRetry] = {}
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
        ends within the API timeout, because the SDK's requests have that timeout.
        It blocks, so the reactor calls it in another thread.
        """
        self._pool.stop()

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._retry_policy

    @property
    def calls_in_flight(self) -> int:
        """
        The number of SDK calls whose thread has not returned yet, including
        calls whose caller stopped waiting for them.
        """
        return len(self._in_flight)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Return a Deferred that fires once no SDK call is in flight, or after
        C{timeout} seconds, whichever comes first. It never fails.
        """
        if not self._in_flight:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        timer: IDelayedCall = self._clock.callLater(
            timeout, lambda: drained.called or drained.callback(None)
        )

        def cancel_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        return drained.addCallback(cancel_timer)

    def pending_retry(self) -> PendingRetry | None:
        """
        Return the call whose next attempt is due first, if any call waits for one.
        """
        if not self._pending_retries:
            return None
        return min(self._pending_retries.values(), key=lambda retry: retry.due)

    @inlineCallbacks
    def call(self, operation: str, **arguments: Any):
        """
        Call one SDK method, such as "list_instances", in the thread pool, and
        retry it after transient failures (429, 5xx, timeouts and connection
        errors), as the retry policy sets.

        A call in L{CREATING_OPERATIONS} is not retried after a failure that the
        API may have carried out, so that no duplicate is created.

        Raises:
            ApiCallFailed: the last attempt failed, or the failure is one that a
                retry cannot fix, such as 403 or 400.
            CancelledError: the caller cancelled the Deferred.
        """
        policy = self._retry_policy
        attempt = 1
        while True:
            error: ApiCallFailed | None = None
            try:
                result = yield self._attempt(operation, arguments)
            except CancelledError:
                raise
            except Exception:
                # Retry-After may be an HTTP date, so it is compared with the
                # wall clock, not with the injected clock.
                error = describe_failure(
                    operation, Failure(), secrets=self._secrets, now=time.time()
                )
            if error is None:
                return result

            retryable = error.transient and attempt < policy.attempts
            if error.maybe_applied and operation in CREATING_OPERATIONS:
                retryable = False
            if not retryable:
                raise error

            delay = policy.delay(attempt, error.retry_after)
            log.warn(
                "Exoscale API call {operation} failed on attempt {attempt}: {error}; "
                "retrying in {delay:.1f} s",
                operation=api_name(operation),
                attempt=attempt,
                delay=delay,
                error=error.detail,
            )
            token = object()
            self._pending_retries[token] = PendingRetry(
                operation=api_name(operation),
                attempt=attempt,
                due=self._clock.seconds() + delay,
                error=error.detail,
            )
            try:
                yield deferLater(self._clock, delay, lambda: None)
            finally:
                del self._pending_retries[token]
            attempt += 1

    def _attempt(self, operation: str, arguments: dict[str, Any]) -> Deferred[Any]:
        """
        Run one attempt of an SDK call in the thread pool.

        The Deferred fails with the SDK's exception, or with
        C{twisted.internet.defer.TimeoutError} if the call outlives the API timeout
        by more than a second. Cancelling it, or its timeout, leaves the thread
        running; L{drain} waits for such threads.
        """
        method = getattr(self._client, operation)
        log.debug("Calling Exoscale {operation}", operation=operation)
        called = self._detached(self._run_in_thread(method, **arguments))
        called.addTimeout(self._timeout + 1, self._clock)
        return called.addBoth(self._call_ended, operation)

    def _detached(self, running: Deferred[Any]) -> Deferred[Any]:
        """
        Return a Deferred with the result of C{running} whose cancellation leaves
        C{running} to end on its own, so that L{drain} can wait for it.
        """
        self._in_flight.add(running)
        result: Deferred[Any] = Deferred()

        def ended(outcome: Any) -> None:
            self._in_flight.discard(running)
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            elif isinstance(outcome, Failure):
                log.debug(
                    "An abandoned Exoscale API call failed: {error}",
                    error=outcome.getErrorMessage(),
                )
            if not self._in_flight:
                drained, self._drained = self._drained, []
                for waiter in drained:
                    if not waiter.called:
                        waiter.callback(None)

        running.addBoth(ended)
        return result

    def _call_ended(self, result: Any, operation: str) -> Any:
        if not isinstance(result, Failure):
            outcome = "success"
        elif result.check(defer.TimeoutError, Timeout):
            outcome = "timeout"
        elif result.check(defer.CancelledError):
            outcome = "cancelled"
        else:
            outcome = "error"
        self._on_call_ended(operation, outcome)
        return result

    @inlineCallbacks
    def wait_for_operation(
        self, operation: dict[str, Any], timeout: float | None = None
    ):
        """
        Poll an operation until it succeeds, and return its final form.

        Args:
            timeout: seconds after which a pending operation is an error; None
                waits until the caller cancels.

        Raises:
            OperationFailed: the operation ended in failure or timeout, or the
                API does not find it (404).
            OperationTimedOut: the operation was still pending after C{timeout}.
        """
        # The polls are a loop of cancellable steps, not a LoopingCall, whose
        # Deferred has no canceller: a cancelled run would leave it polling.
        result: dict[str, Any] = operation
        deadline = None if timeout is None else self._clock.seconds() + timeout
        while result.get("state") == "pending":
            if deadline is not None and self._clock.seconds() >= deadline:
                raise OperationTimedOut(
                    f"Exoscale operation {operation['id']} was still pending after "
                    f"{timeout:.0f} s"
                )
            yield deferLater(self._clock, self._poll_interval, lambda: None)
            try:
                result = yield self.call("get_operation", id=operation["id"])
            except ApiCallFailed as error:
                if error.status != 404:
                    raise
                raise OperationFailed(
                    f"Exoscale operation {operation['id']} is unknown to the API"
                ) from None

        state = result.get("state")
        if state != "success":
            # The API omits the reason of some failures; the SDK's own Client.wait
            # raises KeyError then, which is why it is not used here.
            reason = result.get("reason") or "no reason given"
            raise OperationFailed(
                f"Exoscale operation {operation['id']} ended in {state}: {reason}"
            )
        return result

    @inlineCallbacks
    def wait_for_instance_state(self, instance_id: str, states: set[str]):
        """
        Poll an instance until its state is one of C{states}, and return it.

        Raises:
            InstanceGone: the API does not know the instance.
        """
        while True:
            instance = yield self.get_instance(instance_id)
            if instance.get("state") in states:
                return instance
            yield deferLater(self._clock, self._poll_interval, lambda: None)

    @inlineCallbacks
    def get_instance(self, instance_id: str):
        """
        Return the instance with this id.

        Raises:
            InstanceGone: the API does not know the instance.
        """
        try:
            instance = yield self.call("get_instance", id=instance_id)
        except ApiCallFailed as error:
            if error.status != 404:
                raise
            raise InstanceGone(instance_id) from None
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
        group_id = yield self._find_security_group(name)
        if group_id is not None:
            return group_id

        group_id = yield self._create_security_group(name)
        if group_id is None:
            # Another client created the group meanwhile, with its own rules.
            group_id = yield self._find_security_group(name)
            return group_id
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

    @inlineCallbacks
    def _find_security_group(self, name: str):
        found = yield self.call("list_security_groups")
        for group in found.get("security-groups", []):
            if group.get("name") == name:
                return group["id"]
        return None

    @inlineCallbacks
    def _create_security_group(self, name: str):
        """
        Create the security group and return its id, or None when the API rejects
        the name as taken (409).

        A failure that the API may have carried out is followed by a look for the
        group before the next attempt, so that a retry never creates a second
        group of the same name.
        """
        policy = self._retry_policy
        for attempt in range(1, policy.attempts + 1):
            try:
                operation = yield self.call(
                    "create_security_group",
                    name=name,
                    description="Ollama backend of exoproxy",
                )
            except ApiCallFailed as error:
                if error.status == 409:
                    return None
                if not (error.maybe_applied and attempt < policy.attempts):
                    raise
                delay = policy.delay(attempt, error.retry_after)
                log.warn(
                    "{operation} may have been carried out although it failed "
                    "({error}); looking for the group in {delay:.1f} s",
                    operation="create-security-group",
                    error=error.detail,
                    delay=delay,
                )
                yield deferLater(self._clock, delay, lambda: None)
                group_id = yield self._find_security_group(name)
                if group_id is not None:
                    return group_id
                continue
            operation = yield self.wait_for_operation(operation)
            return operation["reference"]["id"]
        raise AssertionError("the loop returns or raises on its last attempt")
