"""
The `/status` document, built from memory without any API call.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from exoproxy.lifecycle import InstanceLifecycle
from exoproxy.next_action import describe_next_action
from exoproxy.sources import LifecycleSource

if TYPE_CHECKING:
    from exoproxy.gateway import BackendSource
    from exoproxy.service import ExoproxyService


def _timestamp(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def build_status(service: ExoproxyService, source: BackendSource) -> dict[str, Any]:
    """
    Return the status fields of the earlier Flask proxy (service,
    provisioning_status, instance_status, remote_url, zone, instance_type,
    ollama_model, idle_timeout and error), and what an operator needs besides.

    Times are seconds, or ISO 8601 timestamps in UTC.
    """
    config = service.config
    clock = service._clock
    now = clock.seconds()
    activity = service.activity

    status: dict[str, Any] = {
        "service": "exoproxy",
        "mode": service.source_kind,
        "simulated": config.simulate,
        "zone": config.zone,
        "instance_type": str(config.instance_type),
        "ollama_model": config.model,
        "idle_timeout": config.idle_timeout,
        "idle_action": config.idle_action,
        "requests_in_flight": activity.in_flight,
        "last_activity": _timestamp(activity.last_activity),
    }

    if not isinstance(source, LifecycleSource):
        backend = source.current_backend()
        status.update(
            provisioning_status="ready",
            instance_status=None,
            instance_id=None,
            remote_url=backend.url if backend else None,
            phase="ready",
            next_action="proxying every request to the fixed backend",
        )
        return status

    lifecycle = source.lifecycle
    backend = lifecycle.current_backend()
    state = lifecycle.state
    status.update(
        provisioning_status=state,
        instance_status=service.provisioner.instance_state,
        instance_id=lifecycle.instance_id,
        remote_url=backend.url if backend else None,
        phase=lifecycle.phase,
        phase_seconds=round(now - lifecycle.phase_started, 1),
    )
    if state == "ready":
        remaining = config.idle_timeout - activity.idle_for()
        status["idle_stop_in"] = (
            None if activity.in_flight else round(max(remaining, 0), 1)
        )
    if lifecycle.error:
        status["error"] = lifecycle.error
    if state == "error" and lifecycle.retry_at is not None:
        status["retry_in"] = round(max(lifecycle.retry_at - now, 0), 1)
    status.update(_fault_handling(service, lifecycle, now))
    return status


def _fault_handling(
    service: ExoproxyService, lifecycle: InstanceLifecycle, now: float
) -> dict[str, Any]:
    """
    Return what the daemon does next and the state of its fault handling.
    """
    config = service.config
    api_retry = service.cloud.pending_retry() if service.cloud else None
    fields: dict[str, Any] = {
        "next_action": describe_next_action(
            lifecycle=lifecycle,
            config=config,
            activity=service.activity,
            api_retry=api_retry,
            kept_instance_id=service.provisioner.kept_instance_id,
            now=now,
        ),
        "error_needs_operator": lifecycle.error_is_permanent,
        "last_stop_reason": lifecycle.stop_reason,
        "on_ready_timeout": config.on_ready_timeout,
        "on_exit": config.on_exit,
        "max_instance_hours": config.max_instance_hours or None,
        "instances_needing_attention": dict(service.provisioner.needs_attention),
    }
    if api_retry is not None:
        fields["api_retry"] = {
            "operation": api_retry.operation,
            "attempt": api_retry.attempt,
            "retry_in": round(max(api_retry.due - now, 0), 1),
            "error": api_retry.error,
        }
    if lifecycle.max_uptime > 0 and lifecycle.up_since is not None:
        left = lifecycle.up_since + lifecycle.max_uptime - now
        fields["uptime_limit_in"] = round(max(left, 0), 1)
    return fields
