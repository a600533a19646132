"""
The control API of the simulated cloud, under `/_control` next to `/v2` on the
simulator's loopback port. It needs no signature, and it arms faults and shows the
zone's state:

- `GET /_control`: every API call received, every instance and security group,
  the instances ever created, and the armed faults.
- `POST /_control/api-faults`: `{"operation": "create-instance", "kind": "status",
  "status": 503, "count": 2, "retry_after": 1, "after": false}`; `kind` is status,
  malformed, hang or drop.
- `POST /_control/operation-faults`: `{"operation": "start-instance", "outcome":
  "failure", "reason": "no capacity", "count": 1}`; a null `reason` leaves the field
  out, and outcome "pending" never ends.
- `POST /_control/instance-faults`: `{"kind": "lose-ip", "instance_id": "..."}`;
  without `instance_id`, the fault waits for the next created instance.
- `DELETE /_control/faults`: disarm every fault.

For example: `curl -d '{"operation": "*", "kind": "status", "status": 500}'
http://127.0.0.1:PORT/_control/api-faults`.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.web.resource import Resource
from twisted.web.server import Request

from exoproxy.simulator.faults import FaultError, FaultInjector


class _BadRequest(Exception):
    pass


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.content.read() or b"{}")
    except ValueError as error:
        raise _BadRequest(f"invalid JSON in request body: {error}") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return None
    # bool is a subclass of int, so an int field rejects it explicitly.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadRequest(f"{name} must be of type {kind.__name__}")
    return value


class ControlResource(Resource):
    """
    The `/_control` resource of one simulated zone.

    Args:
        faults: The fault injector of the zone.
    """

    isLeaf = True

    def __init__(self, faults: FaultInjector) -> None:
        super().__init__()
        self._faults = faults
        self._routes: dict[tuple[bytes, bytes], Callable[[Request], Any]] = {
            (b"GET", b""): lambda request: faults.snapshot(),
            (b"POST", b"api-faults"): self._api_fault,
            (b"POST", b"operation-faults"): self._operation_fault,
            (b"POST", b"instance-faults"): self._instance_fault,
            (b"DELETE", b"faults"): self._clear,
        }

    def render(self, request: Request) -> bytes:
        name = b"/".join(request.postpath).strip(b"/")
        handler = self._routes.get((request.method, name))
        request.setHeader(b"content-type", b"application/json")
        if handler is None:
            known = any(route == name for _, route in self._routes)
            request.setResponseCode(405 if known else 404)
            message = "method not allowed" if known else "unknown control path"
            return json.dumps({"message": message}).encode()
        try:
            answer = handler(request)
        except (_BadRequest, FaultError) as error:
            request.setResponseCode(400)
            return json.dumps({"message": str(error)}).encode()
        return json.dumps(answer).encode()

    def _api_fault(self, request: Request) -> dict[str, Any]:
        body = _json_body(request)
        fault = self._faults.fail_calls(
            _required(body, "operation"),
            _field(body, "kind", str, "status"),
            count=_field(body, "count", int, 1),
            status=_field(body, "status", int, 503),
            retry_after=_number(body, "retry_after"),
            after=bool(_field(body, "after", bool, False)),
        )
        return {"armed": fault.__dict__}

    def _operation_fault(self, request: Request) -> dict[str, Any]:
        body = _json_body(request)
        reason = body["reason"] if "reason" in body else "Simulated operation failure"
        if reason is not None and not isinstance(reason, str):
            raise _BadRequest("reason must be a string or null")
        fault = self._faults.fail_operations(
            _required(body, "operation"),
            outcome=_field(body, "outcome", str, "failure"),
            reason=reason,
            count=_field(body, "count", int, 1),
        )
        return {"armed": fault.__dict__}

    def _instance_fault(self, request: Request) -> dict[str, Any]:
        body = _json_body(request)
        self._faults.break_instance(
            _required(body, "kind"),
            _field(body, "instance_id", str),
            delay=_number(body, "delay") or 0.0,
            after_chunks=_field(body, "after_chunks", int, 1),
            restart_after=_number(body, "restart_after"),
        )
        return {"armed": self._faults.armed()}

    def _clear(self, request: Request) -> dict[str, Any]:
        self._faults.clear()
        return {"armed": self._faults.armed()}


def _required(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"missing {name}")
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadRequest(f"{name} must be a number")
    return float(value)
