"""
The startup check of the account, the zone, the instance type and the template, so
that a configuration that can never work stops the daemon before it listens, instead
of failing on the first request.
"""

from __future__ import annotations

from typing import Any, Callable

from exoscale.api.exceptions import (
    ExoscaleAPIAuthException,
    ExoscaleAPIClientException,
    ExoscaleAPIServerException,
)
from exoscale.api.v2 import Client
from requests import RequestException
from twisted.logger import Logger

from exoproxy.config import Config, ConfigError
from exoproxy.sdk_runner import _TimeoutAdapter

log = Logger()


def check_account(
    config: Config, client_factory: Callable[..., Client] = Client
) -> None:
    """
    Check with blocking API calls that the credentials work and that the zone has
    the instance type and the template. Call it only before the reactor runs.

    Raises:
        ConfigError: the API rejected the credentials, or the zone lacks the
            instance type or the template. A network error or a server error is
            logged and not raised, because it may pass before the first request.
    """
    client = client_factory(config.api_key, config.api_secret, url=config.api_url)
    adapter = _TimeoutAdapter(config.api_timeout)
    client.http_client.mount("http://", adapter)
    client.http_client.mount("https://", adapter)

    try:
        types = client.list_instance_types().get("instance-types", [])
        templates = client.list_templates(visibility="public").get("templates", [])
    except ExoscaleAPIAuthException:
        raise ConfigError(
            f"the Exoscale API at {config.api_url} rejected the API key "
            f"{config.api_key!r}; check EXOSCALE_API_KEY and the secret, and that "
            "the key may manage compute instances"
        ) from None
    except ExoscaleAPIClientException as error:
        raise ConfigError(
            f"the Exoscale API rejected the startup check: {_status(error)}"
        ) from None
    except (ExoscaleAPIServerException, RequestException, ValueError) as error:
        log.warn(
            "Could not check the Exoscale account at startup ({error}); the first "
            "request will try again",
            error=_status(error),
        )
        return

    check_catalog(config, types, templates)


def check_simulated_catalog(config: Config) -> None:
    """
    Check that the simulated zone has the instance type and the template, with the
    same rules and messages as L{check_account}, but against the simulator's
    catalog in memory, because the simulator's API only responds once the reactor
    runs.

    Raises:
        ConfigError: the simulated zone lacks the instance type or the template.
    """
    from exoproxy.simulator.catalog import build_instance_types, build_templates

    templates = [
        template
        for template in build_templates(config.zone)
        if template.get("visibility") == "public"
    ]
    check_catalog(config, build_instance_types(), templates)


def check_catalog(
    config: Config, types: list[dict[str, Any]], templates: list[dict[str, Any]]
) -> None:
    """
    Check that the listed instance types and public templates contain the
    configured ones. A type that lists its zones must list the configured zone.

    Raises:
        ConfigError: the instance type or the template is missing.
    """
    family = config.instance_type.family
    sizes = [
        t.get("size")
        for t in types
        if t.get("family") == family and config.zone in t.get("zones", [config.zone])
    ]
    if config.instance_type.size not in sizes:
        offered = (
            f"its {family} sizes are {', '.join(sorted(map(str, sizes)))}"
            if sizes
            else f"it has no {family} type"
        )
        raise ConfigError(
            f"--instance-type: zone {config.zone} offers no instance type "
            f"{config.instance_type} ({offered}); list them with "
            "`exo compute instance-type list`"
        )
    if not any(template.get("name") == config.template for template in templates):
        raise ConfigError(
            f"--template: zone {config.zone} has no public template named "
            f"{config.template!r}"
        )


def _status(error: Any) -> str:
    response = getattr(error, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    return type(error).__name__
