"""
Compare the CPU cost of two exoproxy source trees under the same loads.

    python -m bench.compare --base HEAD~1 --rounds 4

The base is a git revision, checked out in a temporary worktree, and the candidate
is the working tree (or `--candidate REV`). Each round runs every load once on each
tree, in alternating order, against one upstream and with the CPUs pinned as in
`bench.run`. A change to the hot path is kept when its CPU per request or per line
is lower in every round, because on a shared machine single runs vary by about
±20 %. The loads are small-request clients back-to-back, and concurrent streams.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.processes import (
    REPOSITORY,
    Managed,
    Sampler,
    clean_environment,
    exoproxy_command,
    free_port,
    pinned,
    plan_cpus,
    run_loadgen,
    start_upstream,
    wait_for_http,
    wait_for_quiet,
)

_LOADS = {
    "small": ["small", "--clients", "1", "--duration", "4"],
    # The CPU per request counts every request sent, so the paced load sends no
    # warm-up requests, which would take most of its duration.
    "small50": [
        "small",
        "--clients",
        "50",
        "--rate",
        "5",
        "--duration",
        "4",
        "--warmup",
        "0",
    ],
    "streams50": ["streams", "--streams", "50", "--lines", "300", "--ramp", "1"],
    "streams200": ["streams", "--streams", "200", "--lines", "300", "--ramp", "1"],
    "streams500": ["streams", "--streams", "500", "--lines", "300", "--ramp", "1"],
}


def _worktree(revision: str, parent: Path) -> Path:
    path = parent / revision.replace("/", "_").replace("~", "_")
    subprocess.run(
        [
            "git",
            "-C",
            str(REPOSITORY),
            "worktree",
            "add",
            "--detach",
            str(path),
            revision,
        ],
        check=True,
        capture_output=True,
    )
    return path


def _start_exoproxy(
    tree: Path, upstream_port: int, cpus: list[int] | None, workdir: Path
) -> tuple[Managed, int]:
    port = free_port()
    command = exoproxy_command(upstream_port, port, workdir / f"{tree.name}.twistd.log")
    environment = clean_environment()
    environment["PYTHONPATH"] = f"{tree}:{environment['PYTHONPATH']}"
    process = Managed(
        tree.name,
        pinned(command, cpus),
        workdir / (tree.name + ".out"),
        cwd=workdir,
        env=environment,
    )
    wait_for_http(port, process)
    return process, port


def _measure(
    process: Managed, port: int, load: list[str], cpus: list[int] | None
) -> dict[str, Any]:
    wait_for_quiet(0.25, 10)
    with Sampler(process) as sample:
        result = run_loadgen(port, load, cpus)
    units = result.get("requests") or result.get("delivered_lines") or 1
    figures = {"cpu_us_per_unit": 1e6 * sample.cpu / units}
    summary = result.get("latency") or result.get("delay") or {}
    figures["p50_ms"] = summary.get("p50_ms")
    figures["p99_ms"] = summary.get("p99_ms")
    if "expected_lines" in result:
        figures["lost_lines"] = result["expected_lines"] - result["delivered_lines"]
    return figures


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__
    )
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument(
        "--candidate", help="git revision to measure [default: the working tree]"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every load")
    parser.add_argument(
        "--loads",
        default="small,streams200",
        help=f"comma-separated loads among {', '.join(_LOADS)}",
    )
    parser.add_argument("--json", type=Path, help="raw figures to write as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    loads = arguments.loads.split(",")
    unknown = [load for load in loads if load not in _LOADS]
    if unknown:
        raise SystemExit(f"bench.compare: unknown load {unknown[0]!r}")

    load_cpus, proxy_cpus = plan_cpus()
    workdir = Path(tempfile.mkdtemp(prefix="exoproxy-compare-"))
    trees = {"base": _worktree(arguments.base, workdir)}
    if arguments.candidate:
        trees["candidate"] = _worktree(arguments.candidate, workdir)
    else:
        trees["candidate"] = REPOSITORY

    upstream, upstream_port = start_upstream(workdir, load_cpus)
    figures: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        wait_for_http(upstream_port, upstream)
        for round_number in range(arguments.rounds):
            order = ["base", "candidate"]
            if round_number % 2:
                order.reverse()
            for name in order:
                process, port = _start_exoproxy(
                    trees[name], upstream_port, proxy_cpus, workdir
                )
                try:
                    run_loadgen(
                        port, _LOADS["small"][:3] + ["--duration", "0.5"], load_cpus
                    )
                    for load in loads:
                        result = _measure(process, port, _LOADS[load], load_cpus)
                        figures.setdefault(load, {}).setdefault(name, []).append(result)
                        print(round_number, name, load, json.dumps(result), flush=True)
                finally:
                    process.stop()
    finally:
        upstream.stop()
        for name, tree in trees.items():
            if tree != REPOSITORY:
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(REPOSITORY),
                        "worktree",
                        "remove",
                        "--force",
                        str(tree),
                    ],
                    check=False,
                )

    print()
    print(
        "| load | figure | base (median) | candidate (median) | candidate / base "
        "| rounds won |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for load, by_tree in figures.items():
        for figure in ("cpu_us_per_unit", "p50_ms", "p99_ms"):
            base = [run[figure] for run in by_tree["base"] if run[figure] is not None]
            candidate = [
                run[figure] for run in by_tree["candidate"] if run[figure] is not None
            ]
            if not base or not candidate:
                continue
            won = sum(c < b for b, c in zip(base, candidate))
            base_median = statistics.median(base)
            candidate_median = statistics.median(candidate)
            print(
                f"| {load} | {figure} | {base_median:.3f} | {candidate_median:.3f} | "
                f"{candidate_median / base_median:.2f} | {won}/{len(candidate)} |"
            )
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
