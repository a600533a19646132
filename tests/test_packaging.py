"""
Tests for the wheel, the twistd plugin and the Dockerfile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import build

REPOSITORY = Path(__file__).resolve().parent.parent

# Files of the checkout that a wheel build must not see: build output, caches, and
# files that only exist on a developer's machine.
_COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "_trial_temp",
    "dropin.cache",
    "twistd.pid",
    "twistd.log",
    ".venv",
)

_ENVIRONMENT_VARIABLES = (
    "EXOSCALE_API_KEY",
    "EXOSCALE_API_SECRET",
    "EXOSCALE_ZONE",
    "EXOSCALE_INSTANCE_TYPE",
    "EXOSCALE_TEMPLATE",
    "EXOSCALE_DISK_SIZE",
    "EXOSCALE_IDLE_TIMEOUT",
    "OLLAMA_MODEL",
)


def _checkout_environment() -> dict[str, str]:
    """Return an environment in which Python imports the checkout first."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = str(REPOSITORY)
    return environment


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_checkout_environment(),
        cwd=REPOSITORY,
        timeout=120,
    )


def _build_wheel(tmp_path: Path) -> Path:
    # Building from a copy keeps build/ and *.egg-info out of the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPOSITORY, source, ignore=_COPY_IGNORE)
    output = tmp_path / "dist"

    command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(output)]

    # Without the backend that pyproject.toml requires, `build` makes an isolated
    # environment and installs it from the package index. That takes seconds and
    # needs the index.
    if not build.ProjectBuilder(source).check_dependencies("wheel"):
        command.append("--no-isolation")

    result = subprocess.run(
        [*command, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    wheels = list(output.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())

    assert "twisted/plugins/exoproxy_plugin.py" in names
    assert "exoproxy/__init__.py" in names
    assert "exoproxy/userdata.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/plugins/dropin.cache" not in names
    assert not [name for name in names if name.startswith("tests/")]
    assert not [name for name in names if name.endswith(".pyc")]


def test_plugin_discovered() -> None:
    code = (
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "for plugin in getPlugins(IServiceMaker):\n"
        "    print(plugin.tapname)\n"
    )

    result = _run_python(code)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split().count("exoproxy") == 1, result.stdout


def test_twistd_help_lists_exoproxy() -> None:
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists(), f"twistd is missing next to {sys.executable}"

    result = subprocess.run(
        [str(twistd), "--help"],
        capture_output=True,
        text=True,
        env=_checkout_environment(),
        cwd=REPOSITORY,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    commands = [line.split() for line in result.stdout.splitlines()]
    assert ["exoproxy"] in [words[:1] for words in commands if words]


def test_plugin_loads_tap_lazily() -> None:
    code = (
        "import sys\n"
        "import twisted.plugins.exoproxy_plugin\n"
        "print('after import', 'exoproxy.tap' in sys.modules)\n"
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "list(getPlugins(IServiceMaker))\n"
        "print('after discovery', 'exoproxy.tap' in sys.modules)\n"
    )

    result = _run_python(code)

    assert result.returncode == 0, result.stderr
    assert "after import False" in result.stdout, result.stdout
    assert "after discovery False" in result.stdout, result.stdout


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """Parse the Dockerfile into (instruction, arguments) pairs."""
    instructions = []
    pending = ""
    for line in (REPOSITORY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue

        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue

        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))

    assert not pending, "the Dockerfile ends with a line continuation"
    return instructions


def _arguments(instruction: str) -> list[str]:
    return [
        arguments
        for keyword, arguments in _dockerfile_instructions()
        if keyword == instruction
    ]


def test_dockerfile_base_image() -> None:
    bases = _arguments("FROM")

    assert bases, "the Dockerfile has no FROM"
    assert bases[-1].split()[0] == "python:3.11-slim"


def test_dockerfile_runs_as_non_root() -> None:
    users = _arguments("USER")

    assert users, "the Dockerfile has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_exposes_ollama_port() -> None:
    ports = [port for arguments in _arguments("EXPOSE") for port in arguments.split()]

    assert "11434" in ports or "11434/tcp" in ports


def test_dockerfile_healthcheck() -> None:
    healthchecks = _arguments("HEALTHCHECK")

    assert len(healthchecks) == 1
    healthcheck = healthchecks[0]
    assert " CMD " in f" {healthcheck} "
    assert "python" in healthcheck
    assert "urllib.request" in healthcheck
    assert "http://127.0.0.1:11434/" in healthcheck
    assert "curl" not in healthcheck


def test_dockerfile_entrypoint() -> None:
    entrypoints = _arguments("ENTRYPOINT")

    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == [
        "twistd",
        "--nodaemon",
        "--pidfile=",
        "exoproxy",
    ]


def test_dockerfile_installs_without_extras() -> None:
    runs = " ".join(_arguments("RUN"))

    assert "pip install" in runs
    assert "[test]" not in runs


def test_dockerfile_documents_environment() -> None:
    text = (REPOSITORY / "Dockerfile").read_text()

    for name in _ENVIRONMENT_VARIABLES:
        assert name in text, name


def test_dockerfile_sets_no_secret() -> None:
    assigned = " ".join(_arguments("ENV") + _arguments("ARG"))

    assert "EXOSCALE_API_KEY" not in assigned
    assert "EXOSCALE_API_SECRET" not in assigned


def test_dockerignore_keeps_build_inputs() -> None:
    patterns = [
        line.strip()
        for line in (REPOSITORY / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert ".git" in patterns
    for needed in ("README.md", "setup.cfg", "pyproject.toml", "exoproxy", "twisted"):
        assert needed not in patterns, needed
