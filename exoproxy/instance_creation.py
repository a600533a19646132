"""
The creation of the managed instance from its template, type, security group, key
material and user-data. After a create-instance call fails in a way that the API may
have carried out, the labelled instances are listed before the call is tried again.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from exoproxy.api_errors import ApiCallFailed
from exoproxy.backend_tls import SERVICE_NAME
from exoproxy.userdata import encode_user_data, render_user_data
from exoproxy.userdata_settings import TerminatorSettings, UserDataSettings

log = Logger()

# The address of Ollama on the instance, behind the TLS terminator.
_OLLAMA_LOOPBACK_HOST = "127.0.0.1"
_OLLAMA_LOOPBACK_PORT = 11434


class InstanceCreation:
    """
    The methods of L{ExoscaleProvisioner} that create the instance. They use the
    attributes that L{ExoscaleProvisioner.__init__} sets, so they work only in that
    class.
    """

    @inlineCallbacks
    def _create(self, set_phase: Callable[[str], None]):
        set_phase("creating instance")
        config = self._config
        template_id = yield self._cloud.find_template_id(config.template)
        type_id = yield self._cloud.find_instance_type_id(
            config.instance_type.family, config.instance_type.size
        )
        group_id = yield self._cloud.ensure_security_group(
            config.instance_name, config.backend_port, config.allowed_networks
        )
        if config.ssh_networks:
            yield self._sync_ssh_rules(group_id)
        material = None
        if self._keyring is None:
            settings = UserDataSettings(
                ollama_port=config.backend_port,
                models=(config.model,),
                gpu=config.instance_type.gpu,
            )
        else:
            material = self._keyring.new_material()
            settings = UserDataSettings(
                ollama_host=_OLLAMA_LOOPBACK_HOST,
                ollama_port=_OLLAMA_LOOPBACK_PORT,
                models=(config.model,),
                gpu=config.instance_type.gpu,
                terminator=TerminatorSettings(
                    port=config.backend_port,
                    server_name=SERVICE_NAME,
                    certificate_pem=material.certificate_pem,
                    private_key_pem=material.private_key_pem,
                    bearer_token=material.bearer_token,
                ),
            )
        user_data = render_user_data(settings)

        ssh_keys = {"ssh_keys": [{"name": config.ssh_key}]} if config.ssh_key else {}
        operation = yield self._create_instance(
            **ssh_keys,
            name=config.instance_name,
            instance_type={"id": type_id},
            template={"id": template_id},
            disk_size=config.disk_size,
            labels=self.labels,
            security_groups=[{"id": group_id}],
            user_data=encode_user_data(user_data),
            public_ip_assignment="inet4",
        )
        operation = yield self._cloud.wait_for_operation(operation)
        instance_id = operation["reference"]["id"]
        self._instance_id = instance_id
        if material is not None:
            self._keyring.bind(instance_id, material)
        log.info(
            "Created instance {instance_id} ({instance_type}, template {template})",
            instance_id=instance_id,
            instance_type=str(config.instance_type),
            template=config.template,
        )
        return instance_id

    @inlineCallbacks
    def _create_instance(self, **arguments: Any):
        """
        Call create-instance and return its operation.

        After a failure that the API may have carried out, the labelled instances
        are listed before the next attempt. An instance found then is the one that
        the failed call created, so it is adopted instead of creating a second
        one, and the operation returned is a finished one that refers to it.
        """
        policy = self._cloud.retry_policy
        for attempt in range(1, policy.attempts + 1):
            try:
                operation = yield self._cloud.call("create_instance", **arguments)
            except ApiCallFailed as error:
                if not (error.maybe_applied and attempt < policy.attempts):
                    raise
                delay = policy.delay(attempt, error.retry_after)
                log.warn(
                    "{operation} may have been carried out although it failed "
                    "({error}); looking for the instance in {delay:.1f} s",
                    operation="create-instance",
                    error=error.detail,
                    delay=delay,
                )
                yield deferLater(self._clock, delay, lambda: None)
                found = yield self._find_instance()
                if found is None:
                    continue
                log.info(
                    "Adopting instance {instance_id}, which the failed "
                    "create-instance made",
                    instance_id=found["id"],
                )
                return {
                    "id": None,
                    "state": "success",
                    "reference": {"id": found["id"]},
                }

            # Recorded before the operation ends, so that a run cancelled now
            # still has the id of the instance to clean up.
            self._instance_id = operation["reference"]["id"]
            return operation
        raise AssertionError("the loop returns or raises on its last attempt")
