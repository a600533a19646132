"""
The Exoscale API v2 under `/v2`, served from a `SimulatedCloud`.

Each request goes through four steps. The path and method are matched against the
`openapi.json` shipped with the `exoscale` package (unknown path 404, wrong method
405). The `EXO2-HMAC-SHA256` signature is verified (403), except for list-zones,
which the SDK calls without credentials. The path, query and body are validated
against the spec with openapi-core (400). Finally the cloud runs the operation.
Every error body is `{"message": "..."}`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qsl

import exoscale
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
from openapi_core.templating.paths.finders import APICallPathFinder
from openapi_core.validation.request.exceptions import (
    InvalidParameter,
    InvalidRequestBody,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request
from werkzeug.datastructures import Headers, ImmutableMultiDict

from exoproxy.simulator.cloud import ApiCall, SimulatedCloud
from exoproxy.simulator.errors import ApiError
from exoproxy.simulator.signature import SignatureError, verify_signature

log = Logger()

SPEC_PATH = Path(exoscale.__file__).parent / "openapi.json"

# Operations that the SDK sends without a signature.
_UNAUTHENTICATED = frozenset({"list-zones"})


@dataclass(frozen=True)
class ApiSpec:
    """
    The loaded API spec.

    Attributes:
        openapi: The openapi-core application that validates requests.
        finder: The matcher of a method and URL to an operation.
        optional_bodies: Operations whose body the spec marks required although
            none of its fields is. The SDK sends no body when the caller passes no
            field (start-instance without `rescue-profile`, for one), so the
            simulator reads a missing body there as `{}`.
    """

    openapi: OpenAPI
    finder: APICallPathFinder
    optional_bodies: frozenset[str]


@functools.cache
def load_api_spec() -> ApiSpec:
    """
    Load the spec shipped with the SDK and prepare it for validation, once per
    process.
    """
    document = json.loads(SPEC_PATH.read_text())
    # The spec's only server is https://api-{zone}.exoscale.com/v2. A relative one
    # matches the paths on whatever host the simulator listens on.
    document["servers"] = [{"url": "/v2"}]

    optional_bodies = set()
    for item in document["paths"].values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema")
            if (
                schema is not None
                and "$ref" not in schema
                and not schema.get("required")
            ):
                optional_bodies.add(operation["operationId"])

    # The shipped spec is the SDK's own, so checking the spec itself is skipped.
    openapi = OpenAPI.from_dict(document, config=Config(spec_validator_cls=None))
    return ApiSpec(
        openapi=openapi,
        finder=APICallPathFinder(openapi.spec),
        optional_bodies=frozenset(optional_bodies),
    )


@dataclass
class _OpenAPIRequest:
    """
    A request in the form that openapi-core validates (its `Request` protocol).
    """

    host_url: str
    path: str
    method: str
    parameters: RequestParameters
    body: bytes | None
    content_type: str


@dataclass(frozen=True)
class ApiRequest:
    """
    A validated request, as the operation handlers take it.

    Attributes:
        path: The path parameters.
        query: The query parameters. A repeated one keeps its last value.
        body: The JSON body, or None for a request without one.
        api_endpoint: The URL of the simulated API, as the SDK's `url=` takes it.
    """

    path: Mapping[str, str]
    query: Mapping[str, str]
    body: Any
    api_endpoint: str


_Handler = Callable[[SimulatedCloud, ApiRequest], dict[str, Any]]


def _list_instances(cloud: SimulatedCloud, call: ApiRequest) -> dict[str, Any]:
    # The simulator has no instance pools, so no instance has a manager.
    if "manager-id" in call.query or "manager-type" in call.query:
        return {"instances": []}
    return cloud.list_instances(
        labels=call.query.get("labels"), ip_address=call.query.get("ip-address")
    )


_HANDLERS: dict[str, _Handler] = {
    "list-zones": lambda cloud, call: cloud.list_zones(call.api_endpoint),
    "get-operation": lambda cloud, call: cloud.get_operation(call.path["id"]),
    "list-templates": lambda cloud, call: cloud.list_templates(
        visibility=call.query.get("visibility"), family=call.query.get("family")
    ),
    "get-template": lambda cloud, call: cloud.get_template(call.path["id"]),
    "list-instance-types": lambda cloud, call: cloud.list_instance_types(),
    "get-instance-type": lambda cloud, call: cloud.get_instance_type(call.path["id"]),
    "list-instances": _list_instances,
    "get-instance": lambda cloud, call: cloud.get_instance(call.path["id"]),
    "create-instance": lambda cloud, call: cloud.create_instance(call.body),
    "start-instance": lambda cloud, call: cloud.start_instance(
        call.path["id"], call.body
    ),
    "stop-instance": lambda cloud, call: cloud.stop_instance(call.path["id"]),
    "delete-instance": lambda cloud, call: cloud.delete_instance(call.path["id"]),
    "list-security-groups": lambda cloud, call: cloud.list_security_groups(
        visibility=call.query.get("visibility")
    ),
    "get-security-group": lambda cloud, call: cloud.get_security_group(call.path["id"]),
    "create-security-group": lambda cloud, call: cloud.create_security_group(call.body),
    "add-rule-to-security-group": lambda cloud, call: (
        cloud.add_rule_to_security_group(call.path["id"], call.body)
    ),
    "delete-rule-from-security-group": lambda cloud, call: (
        cloud.delete_rule_from_security_group(call.path["id"], call.path["rule-id"])
    ),
}


def describe_validation_error(error: Exception) -> str:
    """
    Describe an openapi-core validation error, naming the invalid field.
    """
    cause = error.__cause__
    schema_errors = getattr(cause, "schema_errors", None) or ()
    details = []
    for schema_error in schema_errors:
        field = ".".join(str(part) for part in schema_error.path)
        if isinstance(error, InvalidParameter):
            field = error.name
        details.append(
            f"{field}: {schema_error.message}" if field else schema_error.message
        )

    if isinstance(error, InvalidRequestBody):
        summary = "Invalid request body"
    elif isinstance(error, InvalidParameter):
        summary = f"Invalid {error.location} parameter {error.name}"
    else:
        summary = str(error)
    return ". ".join([summary, *details])


class ExoscaleApiResource(Resource):
    """
    The `/v2` resource: every operation of the API, routed by the spec.

    Args:
        cloud: The zone that runs the operations and logs every call.
        credentials: The accepted API secrets by API key.
        clock: The clock that signature expiry is compared with.
    """

    isLeaf = True

    def __init__(
        self,
        cloud: SimulatedCloud,
        credentials: Mapping[str, str],
        clock: IReactorTime,
    ) -> None:
        super().__init__()
        self._cloud = cloud
        self._credentials = dict(credentials)
        self._clock = clock
        self._spec = load_api_spec()

    def render(self, request: Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        operation_id = None
        faults = self._cloud.faults
        fault = None

        try:
            operation_id, path_parameters = self._route(request, method, path)
            call = self._prepare(request, method, path, operation_id, path_parameters)
            fault = faults.take_api_fault(operation_id, after=False)
            if fault is None:
                with faults.running(operation_id):
                    status, payload = 200, self._run(operation_id, call)
                fault = faults.take_api_fault(operation_id, after=True)
        except ApiError as error:
            status, payload = error.status, {"message": error.message}

        if fault is not None:
            recorded = fault.status if fault.kind == "status" else 200
            if fault.kind in ("hang", "drop"):
                recorded = 0
            self._cloud.record_call(
                ApiCall(operation_id, method, path, recorded, fault=fault.kind)
            )
            log.info(
                "Simulated API {method} {path} ({operation_id}): fault {fault}",
                method=method,
                path=path,
                operation_id=operation_id,
                fault=fault.kind,
            )
            return faults.respond(request, fault)

        self._cloud.record_call(ApiCall(operation_id, method, path, status))
        level = log.debug if status < 400 and method == "GET" else log.info
        level(
            "Simulated API {method} {path} ({operation_id}): {status}",
            method=method,
            path=path,
            operation_id=operation_id,
            status=status,
        )

        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload).encode()

    def _host_url(self, request: Request) -> str:
        host = request.getHost()
        if ":" in host.host:
            return f"http://[{host.host}]:{host.port}"
        return f"http://{host.host}:{host.port}"

    def _route(
        self, request: Request, method: str, path: str
    ) -> tuple[str, dict[str, str]]:
        url = self._host_url(request) + path
        try:
            found = self._spec.finder.find(method.lower(), url)
        except PathNotFound:
            raise ApiError(404, f"Unknown API path {path}") from None
        except OperationNotFound:
            raise ApiError(405, f"Method {method} is not allowed on {path}") from None

        operation_id = (found.operation / "operationId").read_str()
        return operation_id, dict(found.path_result.variables)

    def _prepare(
        self,
        request: Request,
        method: str,
        path: str,
        operation_id: str,
        path_parameters: dict[str, str],
    ) -> ApiRequest:
        """
        Verify the signature and validate the request against the spec.
        """
        query = request.uri.partition(b"?")[2].decode("utf-8", "replace")
        body = request.content.read()

        if operation_id not in _UNAUTHENTICATED:
            authorization = request.getHeader(b"authorization")
            try:
                verify_signature(
                    self._credentials,
                    method=method,
                    path=path,
                    query=query,
                    body=body,
                    authorization=(
                        authorization.decode("latin-1") if authorization else None
                    ),
                    now=self._clock.seconds(),
                )
            except SignatureError as error:
                raise ApiError(403, str(error)) from error

        if not body.strip() and operation_id in self._spec.optional_bodies:
            body = b"{}"
        try:
            parsed_body = json.loads(body) if body.strip() else None
        except ValueError as error:
            raise ApiError(400, f"Invalid JSON in request body: {error}") from error

        query_pairs = parse_qsl(query, keep_blank_values=True)
        headers = Headers(
            [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in _raw_headers(request)
            ]
        )
        content_type = request.getHeader(b"content-type")
        validated = _OpenAPIRequest(
            host_url=self._host_url(request),
            path=path,
            method=method.lower(),
            parameters=_request_parameters(query_pairs, headers, path_parameters),
            body=body or None,
            content_type=(
                content_type.decode("latin-1") if content_type else "application/json"
            ),
        )
        errors = list(self._spec.openapi.request_validator.iter_errors(validated))
        if errors:
            raise ApiError(400, ". ".join(map(describe_validation_error, errors)))

        return ApiRequest(
            path=path_parameters,
            query=dict(query_pairs),
            body=parsed_body,
            api_endpoint=self._host_url(request) + "/v2",
        )

    def _run(self, operation_id: str, call: ApiRequest) -> dict[str, Any]:
        handler = _HANDLERS.get(operation_id)
        if handler is None:
            raise ApiError(
                501, f"Operation {operation_id} is not implemented by the simulator"
            )

        try:
            return handler(self._cloud, call)
        except ApiError:
            raise
        except Exception:
            log.failure(
                "Simulated operation {operation_id} failed", operation_id=operation_id
            )
            raise ApiError(500, f"Simulated operation {operation_id} failed") from None


def _raw_headers(request: Request) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    ]


def _request_parameters(
    query_pairs: list[tuple[str, str]],
    headers: Headers,
    path_parameters: dict[str, str],
) -> RequestParameters:
    return RequestParameters(
        query=ImmutableMultiDict(query_pairs),
        header=headers,
        path=path_parameters,
    )


class _JsonNotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"message": "Not found: the API is under /v2"}).encode()


class ApiRoot(Resource):
    """
    The root of the simulated API site: `/v2` is the API, and any other path is 404.
    """

    def __init__(self, api: ExoscaleApiResource) -> None:
        super().__init__()
        self.putChild(b"v2", api)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _JsonNotFound()

    def render(self, request: Request) -> bytes:
        return _JsonNotFound().render(request)
