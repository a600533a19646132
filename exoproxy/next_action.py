"""
The `next_action` field of `/status`: what exoproxy does next, in one sentence, so
that an operator who reads what went wrong also reads what comes of it.
"""

from __future__ import annotations

from exoproxy.activity import ActivityTracker
from exoproxy.config import Config
from exoproxy.lifecycle import InstanceLifecycle
from exoproxy.lifecycle_interfaces import STOPPED_FOR_UPTIME
from exoproxy.sdk_runner import PendingRetry


def describe_next_action(
    *,
    lifecycle: InstanceLifecycle,
    config: Config,
    activity: ActivityTracker,
    api_retry: PendingRetry | None,
    kept_instance_id: str | None,
    now: float,
) -> str:
    """
    Return what the daemon does next, such as "retrying create-instance in 4 s",
    "waiting for boot; ..." or "stopping idle instance in 1790 s".
    """
    if lifecycle.closing:
        return f"shutting down, and then applying --on-exit {config.on_exit}"
    if api_retry is not None:
        wait = max(api_retry.due - now, 0)
        return (
            f"retrying {api_retry.operation} in {wait:.0f} s (attempt "
            f"{api_retry.attempt} failed: {api_retry.error})"
        )

    state = lifecycle.state
    instance_id = lifecycle.instance_id
    if state == "idle":
        if instance_id is not None and lifecycle.phase == "stopped":
            return (
                f"starting instance {instance_id} on the next request that needs "
                "the model"
            )
        return "bringing an instance up on the next request that needs the model"
    if state == "provisioning":
        return _provisioning(lifecycle, config, now)
    if state == "ready":
        return _ready(lifecycle, config, activity, now)
    if state == "stopping":
        verb = "destroying" if config.idle_action == "destroy" else "stopping"
        if lifecycle.stop_reason == STOPPED_FOR_UPTIME:
            return (
                f"{verb} instance {instance_id}, which has run for "
                "--max-instance-hours"
            )
        return f"{verb} idle instance {instance_id}"
    return _error(lifecycle, kept_instance_id, now)


def _provisioning(lifecycle: InstanceLifecycle, config: Config, now: float) -> str:
    text = lifecycle.phase
    if lifecycle.run_started is None:
        return text
    remaining = lifecycle.run_started + config.ready_timeout - now
    # Past the deadline, the phase itself names the cleanup under way.
    if remaining > 0:
        text += (
            f"; the ready timeout passes in {remaining:.0f} s, and then "
            f"--on-ready-timeout {config.on_ready_timeout} applies"
        )
    return text


def _ready(
    lifecycle: InstanceLifecycle,
    config: Config,
    activity: ActivityTracker,
    now: float,
) -> str:
    if activity.in_flight:
        text = (
            f"serving {activity.in_flight} requests; the idle timer starts when "
            "they end"
        )
    else:
        remaining = max(config.idle_timeout - activity.idle_for(), 0)
        verb = "destroying" if config.idle_action == "destroy" else "stopping"
        text = f"{verb} idle instance in {remaining:.0f} s"
    if lifecycle.max_uptime > 0 and lifecycle.up_since is not None:
        left = max(lifecycle.up_since + lifecycle.max_uptime - now, 0)
        text += f"; stopping it in {left:.0f} s at the latest (--max-instance-hours)"
    return text


def _error(
    lifecycle: InstanceLifecycle, kept_instance_id: str | None, now: float
) -> str:
    wait = max((lifecycle.retry_at or now) - now, 0)
    if wait > 0:
        text = f"retrying on the first request after {wait:.0f} s"
    else:
        text = "retrying on the next request"
    if lifecycle.error_is_permanent:
        text += "; the error recurs until its cause is fixed"
    if kept_instance_id is not None:
        text += (
            f"; instance {kept_instance_id} is left running for inspection "
            "(--on-ready-timeout keep)"
        )
    elif lifecycle.stop_retry_at > now:
        text += (
            f"; stopping instance {lifecycle.instance_id} again in "
            f"{lifecycle.stop_retry_at - now:.0f} s if no request needs it"
        )
    return text
