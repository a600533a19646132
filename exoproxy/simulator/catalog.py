"""
The fixed catalog of a simulated zone: templates, instance types and zones.

Field names and enum values follow the `template`, `instance-type` and `zone` schemas
of the `openapi.json` shipped with the `exoscale` package. Ids are UUIDv5 of the name,
so they are the same in every run.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

# Every zone name that the `zone-name` schema of the API spec lists.
ZONE_NAMES = (
    "at-vie-1",
    "at-vie-2",
    "bg-sof-1",
    "ch-dk-2",
    "ch-gva-2",
    "de-fra-1",
    "de-muc-1",
    "hr-zag-1",
)

_ID_NAMESPACE = uuid.UUID("5d6c6f0e-2a3b-4c1d-9e8f-0a1b2c3d4e5f")

_GIB = 1024**3
_MIB = 1024**2


def _stable_id(kind: str, name: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{name}"))


def _template(
    name: str,
    *,
    family: str,
    default_user: str,
    version: str,
    build: str,
    size: int,
    zone: str,
    visibility: str = "public",
    boot_mode: str = "legacy",
) -> dict[str, Any]:
    return {
        "id": _stable_id("template", name),
        "name": name,
        "description": "",
        "family": family,
        "default-user": default_user,
        "version": version,
        "build": build,
        "size": size,
        "checksum": hashlib.md5(name.encode(), usedforsecurity=False).hexdigest(),
        "boot-mode": boot_mode,
        "ssh-key-enabled": True,
        "password-enabled": True,
        "application-consistent-snapshot-enabled": False,
        "maintainer": "Exoscale" if visibility == "public" else "",
        "visibility": visibility,
        "zones": [zone],
        "created-at": f"{build[:4]}-{build[4:6]}-{build[6:8]}T08:00:00Z",
    }


def build_templates(zone: str) -> list[dict[str, Any]]:
    """
    Build the templates of `zone`: three public Linux images and one private snapshot.
    """
    return [
        _template(
            "Linux Ubuntu 24.04 LTS 64-bit",
            family="ubuntu",
            default_user="ubuntu",
            version="24.04",
            build="20250601",
            size=10 * _GIB,
            zone=zone,
            boot_mode="uefi",
        ),
        _template(
            "Linux Ubuntu 22.04 LTS 64-bit",
            family="ubuntu",
            default_user="ubuntu",
            version="22.04",
            build="20250515",
            size=10 * _GIB,
            zone=zone,
        ),
        _template(
            "Linux Debian 12 (Bookworm) 64-bit",
            family="debian",
            default_user="debian",
            version="12",
            build="20250520",
            size=8 * _GIB,
            zone=zone,
        ),
        _template(
            "ollama-gpu-snapshot",
            family="other",
            default_user="ubuntu",
            version="1",
            build="20250610",
            size=50 * _GIB,
            zone=zone,
            visibility="private",
        ),
    ]


# (family, size, cpus, memory in bytes, gpus or None, zones or None for every zone)
_InstanceTypeRow = tuple[str, str, int, int, int | None, tuple[str, ...] | None]

# NOTE: the CPU, memory and zone figures of the GPU families are illustrative
# values, not Exoscale's published offer, which changes over time.
_INSTANCE_TYPES: tuple[_InstanceTypeRow, ...] = (
    ("standard", "micro", 1, 512 * _MIB, None, None),
    ("standard", "tiny", 1, 1 * _GIB, None, None),
    ("standard", "small", 2, 2 * _GIB, None, None),
    ("standard", "medium", 2, 4 * _GIB, None, None),
    ("standard", "large", 4, 8 * _GIB, None, None),
    ("standard", "extra-large", 4, 16 * _GIB, None, None),
    ("standard", "huge", 8, 32 * _GIB, None, None),
    ("gpua5000", "small", 8, 56 * _GIB, 1, ("at-vie-2", "de-fra-1")),
    ("gpua5000", "medium", 16, 112 * _GIB, 2, ("at-vie-2", "de-fra-1")),
    ("gpua5000", "large", 32, 224 * _GIB, 4, ("at-vie-2", "de-fra-1")),
    ("gpu3", "small", 12, 56 * _GIB, 1, ("at-vie-2", "de-fra-1", "ch-gva-2")),
    ("gpu3", "medium", 24, 120 * _GIB, 2, ("at-vie-2", "de-fra-1", "ch-gva-2")),
)


def build_instance_types() -> list[dict[str, Any]]:
    """
    Build the instance types of the standard, gpua5000 and gpu3 families.
    """
    instance_types = []
    for family, size, cpus, memory, gpus, zones in _INSTANCE_TYPES:
        instance_type: dict[str, Any] = {
            "id": _stable_id("instance-type", f"{family}.{size}"),
            "family": family,
            "size": size,
            "cpus": cpus,
            "memory": memory,
            "authorized": True,
            "zones": list(zones if zones is not None else ZONE_NAMES),
        }
        # The spec declares `gpus` with an exclusive minimum of 0, so types without
        # a GPU leave the field out instead of sending 0.
        if gpus is not None:
            instance_type["gpus"] = gpus
        instance_types.append(instance_type)
    return instance_types
