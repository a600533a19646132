"""
The thread pool that runs the Exoscale SDK's blocking calls for the reactor, with a
timeout on every call, retries with backoff after transient failures, and a record of
the calls in flight.
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


# SDK calls that create something. A retry after a failure that the API may have
# carried out could create a duplicate, so such a failure goes to the caller, which
# looks for the result before it tries again.
CREATING_OPERATIONS = frozenset({"create_instance", "create_security_group"})


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


class SdkRunner:
    """
    The calls of one Exoscale SDK client, each run in a thread pool that this object
    owns, with a timeout and retries.
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
