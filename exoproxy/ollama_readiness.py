"""
The readiness of Ollama on the instance: the JSON requests to its API and the polls
until it lists the configured model.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.iweb import IAgent

log = Logger()

# While Ollama is not up, every this many polls the instance is read again, so
# that an instance that was deleted or lost its address ends the wait early.
_POLLS_PER_INSTANCE_CHECK = 10


def model_names(tags: dict[str, Any]) -> set[str]:
    """
    Return the names in an `/api/tags` response, with and without an implied
    ":latest" tag, because Ollama lists "llama3" as "llama3:latest".
    """
    names = set()
    for model in tags.get("models", []):
        for key in ("name", "model"):
            name = model.get(key)
            if name:
                names.add(name)
                if name.endswith(":latest"):
                    names.add(name.removesuffix(":latest"))
    return names


def json_fetcher(
    agent: IAgent, clock: IReactorTime, timeout: float
) -> Callable[[str], Deferred[Any]]:
    """
    Return a function that GETs a URL and parses its JSON body, within C{timeout}.
    """
    client = HTTPClient(agent)
    rejected_urls: set[str] = set()

    @inlineCallbacks
    def fetch(url: str):
        requested = client.get(url, headers={"Accept": "application/json"})
        response = yield requested.addTimeout(timeout, clock)
        body = yield treq.content(response).addTimeout(timeout, clock)
        if response.code in (401, 403) and url not in rejected_urls:
            # Readiness polls log their failures at debug level, and this one does
            # not go away by waiting.
            rejected_urls.add(url)
            log.error(
                "The backend at {url} rejected exoproxy's bearer secret with HTTP "
                "{code}, so it was not set up with the key material that exoproxy "
                "has for it",
                url=url,
                code=response.code,
            )
        if response.code != 200:
            raise ValueError(f"{url} returned HTTP {response.code}")
        return json.loads(body)

    return fetch


class OllamaReadiness:
    """
    The methods of L{ExoscaleProvisioner} that check Ollama on the instance. They use
    the attributes that L{ExoscaleProvisioner.__init__} sets, so they work only in
    that class.
    """

    @inlineCallbacks
    def _backend_answers(self, url: str):
        """
        Return whether Ollama at C{url} responds to /api/version and lists the
        model.
        """
        try:
            yield self._fetch_json(f"{url}/api/version")
            tags = yield self._fetch_json(f"{url}/api/tags")
        except (CancelledError, ConnectingCancelledError):
            raise
        except Exception as error:
            log.info("Ollama at {url} does not respond: {error}", url=url, error=error)
            return False
        return self._config.model in model_names(tags)

    @inlineCallbacks
    def _wait_for_ollama(
        self,
        url: str,
        set_phase: Callable[[str], None],
        instance_id: str | None = None,
    ):
        """
        Poll Ollama until it answers /api/version and /api/tags lists the model.

        Every few polls the instance is read again, so that an instance that was
        deleted, stopped or lost its address ends the wait at once.
        """
        set_phase("waiting for ollama")
        generation = self._generation
        polls = 0
        while True:
            try:
                version = yield self._fetch_json(f"{url}/api/version")
                tags = yield self._fetch_json(f"{url}/api/tags")
            except (CancelledError, ConnectingCancelledError):
                raise
            except Exception as error:
                log.debug(
                    "Ollama at {url} is not up yet: {error}", url=url, error=error
                )
            else:
                if self._config.model in model_names(tags):
                    self._catalog.record(version, tags)
                    return
                set_phase("pulling model")
            # A cancelled request can also fail with another error, which the
            # handler above takes for a failed poll, so the run's generation
            # shows whether the run was abandoned.
            if generation != self._generation:
                raise CancelledError()
            polls += 1
            if instance_id is not None and polls % _POLLS_PER_INSTANCE_CHECK == 0:
                yield self._check_instance(instance_id)
            yield deferLater(self._clock, self._config.poll_interval, lambda: None)
