"""
Starting, pinning, sampling and stopping the benchmark's processes.

Every process listens on or connects to 127.0.0.1 only. When the machine has at
least two CPUs, `taskset -c` gives the proxy under test one CPU and the upstream and
the load generator the other. The proxy then never competes for a CPU with the load
that it is measured under.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

REPOSITORY = Path(__file__).resolve().parent.parent

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """
    Return a TCP port that is free on 127.0.0.1 now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def plan_cpus() -> tuple[list[int] | None, list[int] | None]:
    """
    Return the CPUs of the load side (upstream and load generator) and of the proxy,
    or (None, None) when the process may use fewer than two CPUs or has no taskset.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 or shutil.which("taskset") is None:
        return None, None
    return [available[0]], [available[1]]


def pinned(command: list[str], cpus: list[int] | None) -> list[str]:
    """
    Return `command` prefixed with `taskset -c CPUS` when `cpus` is given.
    """
    if not cpus:
        return command
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


def twistd_command() -> list[str]:
    """
    Return the command that runs this Python's twistd.
    """
    twistd = shutil.which("twistd", path=os.path.dirname(sys.executable))
    return [twistd] if twistd else [sys.executable, "-m", "twisted"]


def clean_environment() -> dict[str, str]:
    """
    Return this process's environment without the variables that exoproxy, the
    Exoscale SDK or Ollama clients read, and with the repository on PYTHONPATH.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("EXOSCALE_", "EXOPROXY_", "OLLAMA_"))
    }
    paths = [str(REPOSITORY)] + [
        path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path
    ]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


class Managed:
    """
    One child process, with its output in a log file.
    """

    def __init__(self, name: str, command: list[str], log_path: Path, **popen: Any):
        self.name = name
        self.command = command
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.popen = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=popen.pop("env", clean_environment()),
                **popen,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """
        Return the process id and those of its children, such as nginx's worker.
        """
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:
                children.append(int(entry.name))
        return [self.pid, *children]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop the process with SIGTERM, and with SIGKILL if it is still running after
        `timeout` seconds.
        """
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def start_upstream(workdir: Path, cpus: list[int] | None) -> tuple[Managed, int]:
    """
    Start the benchmark's upstream on a free port of 127.0.0.1, with its log in
    `workdir`, and return it with its port. It may not be listening yet.
    """
    port = free_port()
    upstream = Managed(
        "upstream",
        pinned([sys.executable, "-m", "bench.upstream", "--port", str(port)], cpus),
        workdir / "upstream.log",
        cwd=REPOSITORY,
    )
    return upstream, port


def exoproxy_command(upstream_port: int, port: int, log_path: Path) -> list[str]:
    """
    Return the command that runs exoproxy on 127.0.0.1:`port` in front of the
    upstream, with no cloud, logging to `log_path`.
    """
    return twistd_command() + [
        "-n",
        "--pidfile=",
        f"--logfile={log_path}",
        "exoproxy",
        "--backend-url",
        f"http://127.0.0.1:{upstream_port}",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
    ]


def wait_for_http(port: int, process: Managed, timeout: float = 20.0) -> None:
    """
    Wait until `GET /` on 127.0.0.1:`port` returns a status line.

    Raises:
        RuntimeError: the process exited, or nothing responded within `timeout`.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited with status {process.popen.returncode}:\n"
                f"{process.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1."):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{process.name} did not respond on port {port} within {timeout:g} s:\n"
                f"{process.log_tail()}"
            )
        time.sleep(0.05)


def _read_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pids: list[int]) -> float:
    """
    Return the user and system CPU time that these processes have used, in seconds.
    """
    total = 0
    for pid in pids:
        fields = _read_stat(pid)
        if fields is not None:
            # utime and stime are fields 14 and 15 of proc_pid_stat(5).
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    """
    Return the summed resident set size of these processes, in bytes.
    """
    total = 0
    for pid in pids:
        try:
            resident = Path(f"/proc/{pid}/statm").read_text().split()[1]
        except OSError:
            continue
        total += int(resident) * _PAGE_SIZE
    return total


def machine_busy_seconds() -> float:
    """
    Return the user and system CPU time that all processes of the machine have used
    since boot, in seconds.

    Interrupt time is left out because the kernel does not charge it to the
    process that caused it, such as the receiving side of a loopback write.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = map(int, fields[:3])
    return (user + nice + system) / _CLOCK_TICKS


def wait_for_quiet(
    threshold: float, max_wait: float, probe: float = 0.5
) -> tuple[float, float]:
    """
    Wait until the whole machine uses less than `threshold` CPUs over `probe`
    seconds, or until `max_wait` seconds have passed, while the benchmark's own
    processes are idle. On a shared machine this keeps other work, such as a test
    suite, out of the measurement that follows.

    Returns:
        The seconds waited, and the CPUs in use in the last probe.
    """
    started = time.monotonic()
    while True:
        before = machine_busy_seconds()
        time.sleep(probe)
        busy = (machine_busy_seconds() - before) / probe
        waited = time.monotonic() - started
        if busy < threshold or waited >= max_wait:
            return waited, busy


class Sampler:
    """
    Sample the RSS of a process tree in a thread while a measurement runs, and
    measure the CPU that it and the whole machine used meanwhile.
    """

    def __init__(self, process: Managed | None, interval: float = 0.02) -> None:
        self._process = process
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.max_rss = 0
        self.last_rss = 0
        self.cpu = 0.0
        self.machine_cpu = 0.0
        self.wall = 0.0

    def __enter__(self) -> Self:
        self._pids = self._process.pids() if self._process else []
        self._cpu_start = cpu_seconds(self._pids)
        self._machine_start = machine_busy_seconds()
        self._wall_start = time.monotonic()
        if self._pids:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.last_rss = rss_bytes(self._pids)
            self.max_rss = max(self.max_rss, self.last_rss)

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.wall = time.monotonic() - self._wall_start
        self.cpu = cpu_seconds(self._pids) - self._cpu_start
        self.machine_cpu = machine_busy_seconds() - self._machine_start


def run_loadgen(port: int, arguments: list[str], cpus: list[int] | None) -> dict:
    """
    Run one load generator command against 127.0.0.1:`port` and return its result.

    Raises:
        RuntimeError: the load generator failed.
    """
    command = pinned(
        [sys.executable, "-m", "bench.loadgen", "--port", str(port), *arguments], cpus
    )
    finished = subprocess.run(
        command,
        capture_output=True,
        check=False,
        env=clean_environment(),
        cwd=REPOSITORY,
        timeout=900,
    )
    if finished.returncode != 0:
        raise RuntimeError(
            f"the load generator failed ({' '.join(command)}):\n"
            f"{finished.stderr.decode(errors='replace')[-2000:]}"
        )
    return json.loads(finished.stdout)
