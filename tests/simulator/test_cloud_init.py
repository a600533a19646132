"""
Unit tests of the user-data parser, on hand-written cloud-config documents.
"""

from __future__ import annotations

import base64
import gzip

import pytest

from exoproxy.simulator.cloud_init import (
    OLLAMA_DEFAULT_PORT,
    SimulatedBoot,
    UserDataError,
    parse_user_data,
)

FULL_DOCUMENT = """#cloud-config
package_update: true
write_files:
  - path: /etc/motd
    content: "hello"
  - path: /etc/systemd/system/ollama.service.d/exoproxy.conf
    permissions: "0644"
    content: |
      [Service]
      Environment="OLLAMA_KEEP_ALIVE=30m"
      Environment="OLLAMA_HOST=0.0.0.0:11435"
runcmd:
  - [systemctl, daemon-reload]
  - "ollama pull ignored-because-a-string"
  - [sudo, -u, ollama, ollama, pull, ignored-because-wrapped]
  - [ollama, pull, "llama3.2"]
  - [ollama, pull, "granite3.1-dense:8b"]
  - [ollama, list]
"""


def encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def drop_in(host_value: str) -> str:
    return f"""#cloud-config
write_files:
  - path: /etc/systemd/system/ollama.service.d/exoproxy.conf
    content: |
      [Service]
      Environment="OLLAMA_HOST={host_value}"
"""


def test_full_document():
    boot = parse_user_data(encode(FULL_DOCUMENT))

    assert boot.port == 11435
    assert boot.models == ("llama3.2", "granite3.1-dense:8b")


def test_gzip_document():
    compressed = gzip.compress(FULL_DOCUMENT.encode())
    user_data = base64.b64encode(compressed).decode()

    assert parse_user_data(user_data) == parse_user_data(encode(FULL_DOCUMENT))


@pytest.mark.parametrize(
    ("host_value", "port"),
    [
        ("0.0.0.0:11434", 11434),
        ("127.0.0.1:8080", 8080),
        ("[::]:9000", 9000),
        ("http://0.0.0.0:11436", 11436),
        ("0.0.0.0", OLLAMA_DEFAULT_PORT),
        ("[::]", OLLAMA_DEFAULT_PORT),
        ("0.0.0.0:0", 0),
    ],
)
def test_ollama_host_port(host_value, port):
    assert parse_user_data(encode(drop_in(host_value))).port == port


def test_invalid_ollama_port():
    with pytest.raises(UserDataError, match="invalid port"):
        parse_user_data(encode(drop_in("0.0.0.0:70000")))


def test_base64_encoded_file_content():
    content = '[Service]\nEnvironment="OLLAMA_HOST=0.0.0.0:12000"\n'
    document = f"""#cloud-config
write_files:
  - path: /etc/systemd/system/ollama.service.d/exoproxy.conf
    encoding: b64
    content: {base64.b64encode(content.encode()).decode()}
"""
    assert parse_user_data(encode(document)).port == 12000


def test_drop_in_at_other_path_ignored():
    document = drop_in("0.0.0.0:11434").replace("exoproxy.conf", "other.conf")

    assert parse_user_data(encode(document)).port is None


def test_no_ollama_entries():
    document = "#cloud-config\npackages: [curl]\nruncmd:\n  - [echo, hi]\n"

    assert parse_user_data(encode(document)) == SimulatedBoot(port=None, models=())


def test_models_without_drop_in():
    document = "#cloud-config\nruncmd:\n  - [ollama, pull, mistral]\n"

    boot = parse_user_data(encode(document))

    assert boot.port is None
    assert boot.models == ("mistral",)


def test_absent_user_data():
    assert parse_user_data(None) == SimulatedBoot(port=None, models=())
    assert parse_user_data("") == SimulatedBoot(port=None, models=())


def test_shell_script_boots_no_ollama():
    script = "#!/bin/sh\nollama pull llama3.2\n"

    assert parse_user_data(encode(script)) == SimulatedBoot(port=None, models=())


def test_invalid_base64():
    with pytest.raises(UserDataError, match="base64"):
        parse_user_data("not base64!")


def test_corrupt_gzip():
    corrupt = base64.b64encode(b"\x1f\x8b\x08\x00garbage").decode()

    with pytest.raises(UserDataError, match="gzip"):
        parse_user_data(corrupt)


def test_invalid_yaml():
    with pytest.raises(UserDataError, match="YAML"):
        parse_user_data(encode("#cloud-config\nwrite_files: [unclosed\n"))
