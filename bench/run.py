"""
Run the whole benchmark and write its report.

    python -m bench.run --out docs/benchmarks.md --plot docs/benchmark-delay.png

The upstream, exoproxy and nginx run as separate processes on 127.0.0.1, pinned to
the CPUs that `bench.processes.plan_cpus` chooses. See bench/README.md for what the
run needs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import nginx
from bench.processes import (
    REPOSITORY,
    Managed,
    exoproxy_command,
    free_port,
    pinned,
    plan_cpus,
    start_upstream,
    wait_for_http,
)
from bench.report import write_plot, write_report
from bench.scenarios import QUICK, Bench, Settings, Target

CONFIGS = ("direct", "exoproxy", "nginx")
SCENARIOS = ("streams", "small", "saturation", "upload", "coldstart")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _versions(nginx_binary: str | None) -> dict[str, str]:
    import twisted

    versions = {
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "kernel": platform.release(),
    }
    try:
        import uvloop
    except ImportError:
        versions["uvloop"] = "not installed (asyncio's own loop)"
    else:
        versions["uvloop"] = uvloop.__version__
    if nginx_binary:
        versions["nginx"] = nginx.nginx_version(nginx_binary)
    # "-dirty" marks a working tree with changes that are not committed.
    commit = subprocess.run(
        ["git", "-C", str(REPOSITORY), "describe", "--always", "--dirty"],
        check=False,
        capture_output=True,
        text=True,
    )
    versions["exoproxy"] = commit.stdout.strip() or "unknown"
    return versions


def _start_targets(
    configs: list[str],
    workdir: Path,
    upstream_port: int,
    proxy_cpus: list[int] | None,
    nginx_binary: str | None,
) -> list[Target]:
    targets = []
    for name in configs:
        if name == "direct":
            targets.append(Target("direct", upstream_port))
            continue

        port = free_port()
        if name == "exoproxy":
            command = exoproxy_command(
                upstream_port, port, workdir / "exoproxy.twistd.log"
            )
            process = Managed(
                "exoproxy",
                pinned(command, proxy_cpus),
                workdir / "exoproxy.out",
                cwd=workdir,
            )
        else:
            prefix = workdir / "nginx"
            config = nginx.write_config(prefix, port, upstream_port)
            command = nginx.nginx_command(nginx_binary, prefix, config)
            process = Managed(
                "nginx", pinned(command, proxy_cpus), workdir / "nginx.out", cwd=prefix
            )
        targets.append(Target(name, port, process))
        wait_for_http(port, process)
    return targets


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--out", type=Path, help="Markdown report to write")
    parser.add_argument("--plot", type=Path, help="PNG plot to write (matplotlib)")
    parser.add_argument("--json", type=Path, help="raw results to write as JSON")

    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated targets among {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated measurements among {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes that only check that the harness works (a few seconds)",
    )

    parser.add_argument(
        "--no-install",
        action="store_true",
        help="fail instead of installing nginx with apt-get when it is missing",
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the logs and nginx prefix"
    )

    arguments = parser.parse_args(argv)
    arguments.configs = [name for name in arguments.configs.split(",") if name]
    arguments.scenarios = [name for name in arguments.scenarios.split(",") if name]
    for name in arguments.configs:
        if name not in CONFIGS:
            parser.error(f"--configs: unknown target {name!r}")
    for name in arguments.scenarios:
        if name not in SCENARIOS:
            parser.error(f"--scenarios: unknown measurement {name!r}")
    if "direct" not in arguments.configs:
        parser.error("--configs: direct is required, because delays are added to it")
    return arguments


def _nginx_binary(arguments: argparse.Namespace) -> str | None:
    if "nginx" not in arguments.configs:
        return None
    binary = nginx.find_nginx()
    if binary is None:
        if arguments.no_install:
            raise SystemExit(
                "bench: nginx is not installed; install nginx-light or leave it out "
                "with --configs direct,exoproxy"
            )
        binary = nginx.install_nginx()
    return binary


def _coldstart(settings: Settings, proxy_cpus: list[int] | None) -> dict[str, Any]:
    command = pinned(
        [
            sys.executable,
            "-m",
            "bench.coldstart",
            "--runs",
            str(settings.coldstart_runs),
            "--requests",
            str(settings.coldstart_requests),
        ],
        proxy_cpus,
    )
    finished = subprocess.run(
        command, capture_output=True, check=False, cwd=REPOSITORY, timeout=600
    )
    if finished.returncode != 0:
        raise RuntimeError(
            "the cold start measurement failed:\n"
            + finished.stderr.decode(errors="replace")[-3000:]
        )
    return json.loads(finished.stdout)


def run(arguments: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """
    Start the processes, run the selected measurements, stop the processes, and
    return the results.
    """
    settings = QUICK if arguments.quick else Settings()
    load_cpus, proxy_cpus = plan_cpus()
    if load_cpus:
        # The orchestrator's RSS sampler shares the load side's CPU.
        os.sched_setaffinity(0, load_cpus)
    nginx_binary = _nginx_binary(arguments)

    results: dict[str, Any] = {
        "command": "python -m bench.run " + shlex.join(argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": arguments.quick,
        "settings": settings.__dict__,
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": _cpu_model(),
            "memory": _memory_total(),
            "load_cpus": load_cpus,
            "proxy_cpus": proxy_cpus,
        },
        "versions": _versions(nginx_binary),
        "configs": arguments.configs,
    }

    workdir = Path(tempfile.mkdtemp(prefix="exoproxy-bench-"))
    upstream, upstream_port = start_upstream(workdir, load_cpus)
    targets: list[Target] = []
    try:
        wait_for_http(upstream_port, upstream)
        targets = _start_targets(
            arguments.configs, workdir, upstream_port, proxy_cpus, nginx_binary
        )
        bench = Bench(settings, targets, upstream, load_cpus, results)
        bench.warm_up()
        bench.idle_rss("idle")
        if "streams" in arguments.scenarios:
            bench.streams()
        if "small" in arguments.scenarios:
            bench.small_requests()
        if "saturation" in arguments.scenarios:
            bench.saturation()
        if "upload" in arguments.scenarios:
            bench.upload()
        bench.idle_rss("idle_after")
    finally:
        for target in targets:
            if target.process is not None:
                target.process.stop()
        upstream.stop()
        if arguments.keep_workdir:
            print(f"bench: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if "coldstart" in arguments.scenarios:
        results["coldstart"] = _coldstart(settings, proxy_cpus)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    arguments = _arguments(argv)
    results = run(arguments, argv)
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    if arguments.plot:
        write_plot(results, arguments.plot)
    if arguments.out:
        write_report(results, arguments.out, arguments.plot)
    if not (arguments.out or arguments.json):
        json.dump(results, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
