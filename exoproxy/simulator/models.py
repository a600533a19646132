"""
The models and blobs on a simulated instance's disk, described as Ollama lists them.

A `ModelStore` belongs to one simulated instance and outlives its Ollama server, the
way an instance's disk survives a stop and start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

# Sizes and details of a few well-known models, as `ollama list` shows them. Other
# names get figures derived from their hash.
_KNOWN_MODELS: dict[str, tuple[int, str, str, str]] = {
    # name without tag: (size in bytes, family, parameter size, quantization)
    "llama3.2": (2_019_393_189, "llama", "3.2B", "Q4_K_M"),
    "llama3.1": (4_920_753_328, "llama", "8.0B", "Q4_K_M"),
    "qwen2.5": (4_683_087_332, "qwen2", "7.6B", "Q4_K_M"),
    "mistral": (4_113_301_824, "llama", "7.2B", "Q4_0"),
    "gemma2": (5_443_152_417, "gemma2", "9.2B", "Q4_0"),
    "nomic-embed-text": (274_302_450, "nomic-bert", "137M", "F16"),
}


def format_timestamp(seconds: float) -> str:
    """
    Format a POSIX timestamp as the RFC 3339 UTC time that Ollama writes.
    """
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def normalize_model_name(name: str) -> str:
    """
    Add the `latest` tag to a model name without a tag, as Ollama does.
    """
    last_segment = name.rsplit("/", 1)[-1]
    if ":" in last_segment:
        return name
    return f"{name}:latest"


@dataclass(frozen=True)
class ModelRecord:
    """
    One pulled model.

    Attributes:
        name: The normalized name, with its tag.
        size: The size of the model on disk, in bytes.
        digest: The hex SHA-256 of the manifest, without the `sha256:` prefix.
        family: The architecture family, such as `llama`.
        parameter_size: The parameter count as Ollama prints it, such as `3.2B`.
        quantization_level: The quantization, such as `Q4_K_M`.
        modified_at: When the model was pulled, as a POSIX timestamp.
    """

    name: str
    size: int
    digest: str
    family: str
    parameter_size: str
    quantization_level: str
    modified_at: float

    @classmethod
    def for_name(cls, name: str, pulled_at: float) -> ModelRecord:
        """
        Describe the model `name`, pulled at `pulled_at`.
        """
        name = normalize_model_name(name)
        base_name = name.rsplit(":", 1)[0].rsplit("/", 1)[-1]
        digest = hashlib.sha256(f"manifest:{name}".encode()).hexdigest()

        known = _KNOWN_MODELS.get(base_name)
        if known is not None:
            size, family, parameter_size, quantization = known
        else:
            size = 3_000_000_000 + int(digest[:8], 16) % 2_000_000_000
            family, parameter_size, quantization = "llama", "7B", "Q4_K_M"

        return cls(
            name=name,
            size=size,
            digest=digest,
            family=family,
            parameter_size=parameter_size,
            quantization_level=quantization,
            modified_at=pulled_at,
        )

    @property
    def is_embedding_model(self) -> bool:
        return self.family.endswith("bert")

    def details(self) -> dict[str, Any]:
        """
        Build the `details` object of `/api/tags`, `/api/ps` and `/api/show`.
        """
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def tags_entry(self) -> dict[str, Any]:
        """
        Build this model's entry of the `/api/tags` list.
        """
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": format_timestamp(self.modified_at),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


@dataclass
class ModelStore:
    """
    The models and blobs on one simulated instance's disk.

    Attributes:
        models: The pulled models by normalized name.
        blobs: Uploaded blobs by digest, in the `sha256:<hex>` form.
    """

    models: dict[str, ModelRecord] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, pulled_at: float) -> ModelRecord:
        """
        Record `name` as pulled at `pulled_at`, replacing an earlier pull.
        """
        record = ModelRecord.for_name(name, pulled_at)
        self.models[record.name] = record
        return record

    def find(self, name: str) -> ModelRecord | None:
        """
        Return the pulled model `name`, with or without its tag, or None.
        """
        return self.models.get(normalize_model_name(name))
