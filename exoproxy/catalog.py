"""
What the backend reported about itself the last time it was up, so that polling clients
can be answered while the instance is stopped.
"""

from __future__ import annotations

import copy
from typing import Any

# Reported by /api/version before any backend has answered: the oldest Ollama
# release whose API exoproxy relays.
UNKNOWN_VERSION = "0.5.0"


class BackendCatalog:
    """
    The last `/api/version` and `/api/tags` responses of the backend.
    """

    def __init__(self, configured_model: str) -> None:
        self._configured_model = configured_model
        self.version = UNKNOWN_VERSION
        self._tags: dict[str, Any] | None = None

    def record(self, version: dict[str, Any] | None, tags: dict[str, Any]) -> None:
        if version and isinstance(version.get("version"), str):
            self.version = version["version"]
        if isinstance(tags.get("models"), list):
            self._tags = copy.deepcopy(tags)

    def tags(self) -> dict[str, Any]:
        """
        Return the last model list, or the configured model before there is one.
        """
        if self._tags is not None:
            return copy.deepcopy(self._tags)
        name = self._configured_model
        if ":" not in name:
            name = f"{name}:latest"
        return {"models": [{"name": name, "model": name}]}

    def openai_models(self) -> dict[str, Any]:
        """
        Return the last model list in the shape of OpenAI's `/v1/models`.
        """
        models = [
            {
                "id": model.get("name") or model.get("model"),
                "object": "model",
                "created": 0,
                "owned_by": "library",
            }
            for model in self.tags()["models"]
        ]
        return {"object": "list", "data": models}
