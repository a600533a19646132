"""
Tests for the cloud-init user-data of Ollama instances.
"""

from __future__ import annotations

import base64
import gzip
import os
import random
import shlex
import shutil
import string
import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from exoproxy.userdata import (
    MAX_USER_DATA_LENGTH,
    OLLAMA_DROP_IN_PATH,
    encode_user_data,
    render_user_data,
)
from exoproxy.userdata_settings import UserDataSettings

GPU = UserDataSettings(models=("llama3.2:1b", "qwen2.5:0.5b"), gpu=True)
CPU = UserDataSettings(models=("llama3.2:1b",), gpu=False)

_INSTALL_SCRIPT_URL = "https://ollama.com/install.sh"


def _load(settings: UserDataSettings) -> dict[str, Any]:
    document = yaml.safe_load(render_user_data(settings))
    assert isinstance(document, dict)
    return document


def _drop_in_content(document: dict[str, Any]) -> str:
    entries = [e for e in document["write_files"] if e["path"] == OLLAMA_DROP_IN_PATH]
    assert len(entries) == 1
    return entries[0]["content"]


def _pull_items(document: dict[str, Any]) -> list[Any]:
    return [
        item
        for item in document["runcmd"]
        if isinstance(item, list) and item[:2] == ["ollama", "pull"]
    ]


def _index_of(runcmd: list[Any], predicate: Any) -> int:
    matches = [index for index, item in enumerate(runcmd) if predicate(item)]
    assert len(matches) == 1, runcmd
    return matches[0]


def _shellify(runcmd: list[Any]) -> str:
    """Join runcmd items into one script, as cloud-init's `util.shellify` does."""
    lines = ["#!/bin/sh"]
    for item in runcmd:
        if isinstance(item, list):
            lines.append(" ".join(shlex.quote(str(word)) for word in item))
        else:
            lines.append(item)
    return "\n".join(lines) + "\n"


def _require_cloud_init() -> str:
    path = shutil.which("cloud-init")
    if path is not None:
        return path

    reason = (
        "the cloud-init command is missing; install it with "
        "`apt-get update && apt-get install -y cloud-init`"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _cloud_init_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_require_cloud_init(), "schema", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("settings", [GPU, CPU], ids=["gpu", "cpu"])
def test_schema_valid(settings: UserDataSettings, tmp_path: Path) -> None:
    path = tmp_path / "user-data.yaml"
    path.write_text(render_user_data(settings))

    result = _cloud_init_schema(path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_schema_rejects_broken_document(tmp_path: Path) -> None:
    document = _load(CPU)
    document["runcmd"] = 5
    path = tmp_path / "user-data.yaml"
    path.write_text("#cloud-config\n" + yaml.safe_dump(document))

    result = _cloud_init_schema(path)

    assert result.returncode != 0
    assert "runcmd" in result.stdout + result.stderr


@pytest.mark.parametrize("settings", [GPU, CPU], ids=["gpu", "cpu"])
def test_render_parses_as_cloud_config(settings: UserDataSettings) -> None:
    text = render_user_data(settings)

    assert text.startswith("#cloud-config\n")
    assert isinstance(yaml.safe_load(text), dict)


@pytest.mark.parametrize("settings", [GPU, CPU], ids=["gpu", "cpu"])
def test_render_never_upgrades_packages(settings: UserDataSettings) -> None:
    document = _load(settings)

    assert document.get("package_upgrade") is False
    assert document.get("package_reboot_if_required") is False


def test_drop_in_default_address() -> None:
    content = _drop_in_content(_load(CPU))

    assert content.splitlines() == [
        "[Service]",
        'Environment="OLLAMA_HOST=0.0.0.0:11434"',
    ]


def test_drop_in_custom_address() -> None:
    settings = UserDataSettings(
        models=(), gpu=False, ollama_port=8080, ollama_host="10.0.0.5"
    )
    document = _load(settings)

    assert 'Environment="OLLAMA_HOST=10.0.0.5:8080"' in _drop_in_content(document)
    assert "export OLLAMA_HOST=10.0.0.5:8080" in document["runcmd"]


def test_drop_in_ipv6_address() -> None:
    settings = UserDataSettings(models=(), gpu=False, ollama_host="::")
    document = _load(settings)

    assert 'Environment="OLLAMA_HOST=[::]:11434"' in _drop_in_content(document)
    assert "export OLLAMA_HOST=[::1]:11434" in document["runcmd"]


@pytest.mark.parametrize("host", ["localhost", "ollama.internal", "192.0.2.7"])
def test_drop_in_named_host(host: str) -> None:
    settings = UserDataSettings(models=(), gpu=False, ollama_host=host)
    document = _load(settings)

    assert f'Environment="OLLAMA_HOST={host}:11434"' in _drop_in_content(document)
    assert f"export OLLAMA_HOST={host}:11434" in document["runcmd"]


def test_pull_items_are_lists_in_order() -> None:
    document = _load(GPU)

    assert _pull_items(document) == [
        ["ollama", "pull", "llama3.2:1b"],
        ["ollama", "pull", "qwen2.5:0.5b"],
    ]


def test_pull_without_models() -> None:
    document = _load(UserDataSettings(models=(), gpu=False))

    assert _pull_items(document) == []
    assert "ollama pull" not in render_user_data(UserDataSettings(models=(), gpu=False))


@pytest.mark.parametrize("settings", [GPU, CPU], ids=["gpu", "cpu"])
def test_runcmd_order(settings: UserDataSettings) -> None:
    runcmd = _load(settings)["runcmd"]

    set_e = _index_of(runcmd, lambda item: item == "set -e")
    home = _index_of(runcmd, lambda item: item == "export HOME=/root")
    download = _index_of(
        runcmd, lambda item: isinstance(item, list) and _INSTALL_SCRIPT_URL in item
    )
    install = _index_of(
        runcmd, lambda item: isinstance(item, list) and item[:1] == ["sh"]
    )
    reload = _index_of(runcmd, lambda item: item == ["systemctl", "daemon-reload"])
    enable = _index_of(runcmd, lambda item: item == ["systemctl", "enable", "ollama"])
    restart = _index_of(runcmd, lambda item: item == ["systemctl", "restart", "ollama"])
    wait = _index_of(
        runcmd, lambda item: isinstance(item, str) and item.startswith("attempt=0;")
    )
    first_pull = runcmd.index(_pull_items({"runcmd": runcmd})[0])

    assert set_e == 0
    assert home < first_pull
    assert download < install < reload < enable < restart < wait < first_pull


def test_wait_loop_is_bounded() -> None:
    runcmd = _load(CPU)["runcmd"]
    wait = runcmd[
        _index_of(
            runcmd,
            lambda item: isinstance(item, str) and item.startswith("attempt=0;"),
        )
    ]

    assert "http://127.0.0.1:11434/" in wait
    assert "--max-time" in wait
    assert "-ge 120 ]; then" in wait
    assert "exit 1" in wait


def test_gpu_driver_before_ollama() -> None:
    document = _load(GPU)
    runcmd = document["runcmd"]
    scripts = {e["path"]: e for e in document["write_files"]}

    setup_path = "/usr/local/sbin/exoproxy-nvidia-setup"
    driver = _index_of(runcmd, lambda item: item == [setup_path])
    install = _index_of(
        runcmd, lambda item: isinstance(item, list) and item[:1] == ["sh"]
    )

    assert driver < install
    assert scripts[setup_path]["permissions"] == "0755"
    assert "ubuntu-drivers install --gpgpu" in scripts[setup_path]["content"]
    assert "nvidia-utils-" in scripts[setup_path]["content"]
    assert "modprobe nvidia\n" in scripts[setup_path]["content"]
    assert "modprobe nvidia_uvm\n" in scripts[setup_path]["content"]
    modules = scripts["/etc/modules-load.d/exoproxy-nvidia.conf"]["content"]
    assert modules.split() == ["nvidia", "nvidia_uvm"]
    assert "ubuntu-drivers-common" in document["packages"]


def test_cpu_has_no_driver_step() -> None:
    text = render_user_data(CPU)
    document = yaml.safe_load(text)

    assert "nvidia" not in text.lower()
    assert "ubuntu-drivers" not in text
    assert [e["path"] for e in document["write_files"]] == [OLLAMA_DROP_IN_PATH]
    assert "drivers" not in document


@pytest.mark.parametrize("settings", [GPU, CPU], ids=["gpu", "cpu"])
def test_scripts_pass_sh_syntax_check(
    settings: UserDataSettings, tmp_path: Path
) -> None:
    document = _load(settings)
    scripts = {"runcmd": _shellify(document["runcmd"])}
    for entry in document["write_files"]:
        if entry["content"].startswith("#!/bin/sh"):
            scripts[entry["path"]] = entry["content"]

    for name, script in scripts.items():
        path = tmp_path / "script.sh"
        path.write_text(script)
        result = subprocess.run(
            ["sh", "-n", str(path)], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_encode_plain_base64() -> None:
    text = render_user_data(GPU)

    encoded = encode_user_data(text)

    assert len(encoded) <= MAX_USER_DATA_LENGTH
    assert encoded.isascii()
    assert base64.b64decode(encoded, validate=True).decode("utf-8") == text


def test_encode_gzip_when_plain_too_long() -> None:
    models = tuple(f"library/model-{index}:latest" for index in range(2000))
    text = render_user_data(UserDataSettings(models=models, gpu=True))
    assert len(base64.b64encode(text.encode())) > MAX_USER_DATA_LENGTH

    encoded = encode_user_data(text)
    raw = base64.b64decode(encoded, validate=True)

    assert len(encoded) <= MAX_USER_DATA_LENGTH
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw).decode("utf-8") == text


def test_encode_is_deterministic() -> None:
    models = tuple(f"model-{index}" for index in range(3000))
    text = render_user_data(UserDataSettings(models=models, gpu=False))

    assert encode_user_data(text) == encode_user_data(text)


def test_encode_too_large_after_gzip() -> None:
    alphabet = string.ascii_letters + string.digits
    generator = random.Random(20240)
    models = tuple(
        "".join(generator.choice(alphabet) for _ in range(24)) for _ in range(2000)
    )
    text = render_user_data(UserDataSettings(models=models, gpu=False))

    with pytest.raises(ValueError) as caught:
        encode_user_data(text)

    message = str(caught.value)
    assert str(MAX_USER_DATA_LENGTH) in message
    size = len(base64.b64encode(gzip.compress(text.encode(), 9, mtime=0)))
    assert str(size) in message


def test_encode_rejects_empty() -> None:
    with pytest.raises(ValueError):
        encode_user_data("")


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_settings_reject_port(port: int) -> None:
    with pytest.raises(ValueError, match=str(port)):
        UserDataSettings(models=(), gpu=False, ollama_port=port)


@pytest.mark.parametrize("port", [1, 11434, 65535])
def test_settings_accept_port(port: int) -> None:
    assert UserDataSettings(models=(), gpu=False, ollama_port=port).ollama_port == port


@pytest.mark.parametrize(
    "model",
    [
        "",
        "llama 3",
        "llama3\n",
        "\tllama3",
        "llama3;reboot",
        "llama3&&reboot",
        "llama3|sh",
        "$(reboot)",
        "`reboot`",
        "llama3>out",
        "llama3<in",
        "'llama3'",
        '"llama3"',
        "llama3\\",
        "llama*",
        "llama?",
        "llama3#x",
        "~llama3",
        "-rf",
        "llama3(1)",
        "llama3{a,b}",
    ],
)
def test_settings_reject_model(model: str) -> None:
    with pytest.raises(ValueError) as caught:
        UserDataSettings(models=("llama3.2:1b", model), gpu=False)

    assert repr(model) in str(caught.value)


@pytest.mark.parametrize(
    "model",
    [
        "llama3.2:1b",
        "library/qwen2.5:0.5b",
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        "nomic-embed-text",
        "granite3.1-dense:8b",
    ],
)
def test_settings_accept_model(model: str) -> None:
    settings = UserDataSettings(models=[model], gpu=False)

    assert settings.models == (model,)
    assert _pull_items(_load(settings)) == [["ollama", "pull", model]]


@pytest.mark.parametrize(
    "host",
    ["", "0.0.0.0; reboot", "host name", 'a"b', "bad_host", "-host", "fe80::1%eth0"],
)
def test_settings_reject_host(host: str) -> None:
    with pytest.raises(ValueError) as caught:
        UserDataSettings(models=(), gpu=False, ollama_host=host)

    assert repr(host) in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"models": "llama3"},
        {"models": (1,)},
        {"gpu": "yes"},
        {"ollama_port": "11434"},
        {"ollama_port": True},
        {"ollama_host": 127},
    ],
)
def test_settings_reject_types(fields: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"models": (), "gpu": False, **fields}

    with pytest.raises(TypeError):
        UserDataSettings(**arguments)


def test_settings_frozen_and_keyword_only() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        CPU.gpu = True  # type: ignore[misc]

    with pytest.raises(TypeError):
        UserDataSettings(11434, (), False)  # type: ignore[misc]
