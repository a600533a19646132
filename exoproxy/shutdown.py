"""
The daemon's shutdown, and the --on-exit action on the managed instance.

The default, stop, protects the user's money: an instance that runs while no daemon
proxies to it bills GPU hours for nothing, and a stopped instance keeps its disk and
pulled model, so that the next start is quicker. destroy deletes the instance with
its disk. keep leaves it as it is, for a restart that adopts it at once.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from exoproxy.activity import ActivityTracker
from exoproxy.cloud import ExoscaleCloud
from exoproxy.config import Config
from exoproxy.instance_actions import ACTIVE_STATES
from exoproxy.lifecycle import InstanceLifecycle
from exoproxy.provisioner import ExoscaleProvisioner

log = Logger()

# How often the shutdown checks whether the requests in flight have ended.
_REQUEST_POLL_INTERVAL = 0.05


@inlineCallbacks
def shut_down_instance(
    *,
    config: Config,
    clock: IReactorTime,
    lifecycle: InstanceLifecycle,
    provisioner: ExoscaleProvisioner,
    cloud: ExoscaleCloud,
    activity: ActivityTracker,
):
    """
    End the lifecycle and apply --on-exit, each step within --shutdown-timeout.

    Requests that wait for a cold start get 503 at once. Requests in flight may
    end first; after the timeout the action goes ahead, and a stream that it cuts
    ends with a closed connection. A create or start call in flight ends before
    the labelled instances are listed, so that an instance it makes is included.

    A failed action is logged as an error, and the Deferred still succeeds.
    """
    timeout = config.shutdown_timeout
    action = config.on_exit
    instance_id = lifecycle.instance_id
    may_run = lifecycle.state != "idle" or provisioner.instance_state in ACTIVE_STATES
    needed = may_run or (action == "destroy" and instance_id is not None)

    lifecycle.close()
    provisioner.cancel_background()
    yield _requests_ended(activity, clock, timeout)

    if action == "keep":
        if may_run:
            log.warn(
                "Leaving instance {instance_id} as it is (--on-exit keep); it is "
                "billed until it is stopped",
                instance_id=instance_id or "(not known yet)",
            )
    elif needed:
        yield cloud.drain(timeout)
        log.info("Applying --on-exit {action} to the instance", action=action)
        try:
            done = provisioner.shut_down_all(action)
            outcomes = yield done.addTimeout(timeout, clock)
        except Exception as error:
            log.error(
                "Applying --on-exit {action} failed, so the instance may still "
                "run; check it with the Exoscale console or CLI: {error}",
                action=action,
                error=str(error) or type(error).__name__,
            )
        else:
            for outcome in outcomes:
                log.info(
                    "--on-exit {action}: {outcome}", action=action, outcome=outcome
                )

    yield cloud.drain(timeout)
    if cloud.calls_in_flight:
        log.warn(
            "{count} Exoscale API calls are still in flight after {timeout:.0f} s",
            count=cloud.calls_in_flight,
            timeout=timeout,
        )


@inlineCallbacks
def _requests_ended(activity: ActivityTracker, clock: IReactorTime, timeout: float):
    waited = 0.0
    if activity.in_flight:
        log.info(
            "Waiting up to {timeout:.0f} s for {count} requests in flight",
            timeout=timeout,
            count=activity.in_flight,
        )
    while activity.in_flight and waited < timeout:
        yield deferLater(clock, _REQUEST_POLL_INTERVAL, lambda: None)
        waited += _REQUEST_POLL_INTERVAL
    if activity.in_flight:
        log.warn(
            "{count} requests are still in flight after {timeout:.0f} s; they end "
            "with the shutdown",
            count=activity.in_flight,
            timeout=timeout,
        )
