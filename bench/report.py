"""
The Markdown report and the delay plot of one benchmark run.

`write_report` replaces only the text between the two markers below when the file
already has them, so that notes written by hand around the results are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench:results:begin (written by python -m bench.run) -->"
END = "<!-- bench:results:end -->"

_PROXIES = ("exoproxy", "nginx")
_MIB = 2**20

# A 1 GiB upload may grow exoproxy's RSS by at most this much.
_UPLOAD_GROWTH_LIMIT = 50 * _MIB


def _number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator or numerator < 0 or denominator < 0:
        return "–"
    return f"{numerator / denominator:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _compared_rows(
    by_target: dict[str, dict[str, Any]],
    label: str,
    value: Callable[[dict[str, Any]], float | None],
    prefix: list[str],
    digits: int = 2,
) -> list[str]:
    """
    Return one row: the value on each target, each proxy's difference to direct,
    and the ratio of exoproxy's difference to nginx's.
    """
    values = {name: value(result) for name, result in by_target.items()}
    direct = values.get("direct")
    added = {
        name: (
            (values[name] - direct)
            if values.get(name) is not None and direct is not None
            else None
        )
        for name in _PROXIES
    }
    return prefix + [
        label,
        _number(direct, digits),
        _number(values.get("exoproxy"), digits),
        _number(values.get("nginx"), digits),
        _signed(added["exoproxy"]),
        _signed(added["nginx"]),
        _ratio(added["exoproxy"], added["nginx"]),
    ]


def _proxy_rows(
    by_target: dict[str, dict[str, Any]],
    label: str,
    value: Callable[[dict[str, Any]], float | None],
    prefix: list[str],
    digits: int = 1,
) -> list[str]:
    """
    Return one row of a figure that only proxies have, such as their CPU use.
    """
    values = {name: value(result) for name, result in by_target.items()}
    return prefix + [
        label,
        "–",
        _number(values.get("exoproxy"), digits),
        _number(values.get("nginx"), digits),
        "",
        "",
        _ratio(values.get("exoproxy"), values.get("nginx")),
    ]


def _delivered(result: dict[str, Any]) -> str:
    return f"{result['delivered_lines']}/{result['expected_lines']}"


def _cpu_per_line(result: dict[str, Any]) -> float | None:
    if "proxy_cpu_s" not in result or not result["delivered_lines"]:
        return None
    return result["proxy_cpu_s"] * 1e6 / result["delivered_lines"]


def _last_kept_up_step(saturation: dict[str, Any], name: str) -> dict[str, Any] | None:
    steps = saturation.get(name, {}).get("steps", [])
    kept_up_steps = [step for step in steps if step["kept_up"]]
    return kept_up_steps[-1] if kept_up_steps else None


def _estimated_capacity(saturation: dict[str, Any], name: str) -> float | None:
    """
    Estimate the lines/s that a proxy relays at 100 % of one CPU, from its CPU time
    per line at its highest kept-up saturation step.
    """
    step = _last_kept_up_step(saturation, name)
    cpu_per_line = _cpu_per_line(step) if step else None
    return 1e6 / cpu_per_line if cpu_per_line else None


def _header(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    versions = results["versions"]
    if machine["load_cpus"]:
        pinning = (
            f"upstream, load generator and orchestrator on CPU "
            f"{machine['load_cpus'][0]}; the proxy under test on CPU "
            f"{machine['proxy_cpus'][0]} (`taskset -c`)"
        )
    else:
        pinning = "none (fewer than two CPUs, or no taskset)"
    rows = [
        ["date", results["started"]],
        ["command", f"`{results['command']}`"],
        ["nproc", str(machine["nproc"])],
        ["CPU model", machine["cpu"]],
        ["memory", machine["memory"]],
        ["pinning", pinning],
    ]
    rows += [[name, version] for name, version in versions.items()]
    return _table(["machine and versions", ""], rows)


def _streams_section(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    lines = [
        f"### Streams: concurrent `/api/chat` streams at {settings['stream_rate']:g} "
        f"lines/s each, {settings['stream_seconds']:g} s",
        "",
        "Delay is the time from the upstream writing a line to the load generator "
        f"reading it. The streams start spread over {settings['stream_ramp']:g} s; "
        "the p50 and p99 rows cover the steady state, from 0.5 s after the last "
        "stream's first line to the first stream's last line, and the start-up row "
        "covers every line. The difference columns are the delay that each proxy "
        "adds to the direct connection at the same concurrency.",
        "",
    ]
    rows = []
    for streams, by_target in results["streams"].items():
        prefix = [streams]
        delivered = [
            _delivered(by_target[name]) if name in by_target else "–"
            for name in ("direct", "exoproxy", "nginx")
        ]
        rows.append(prefix + ["lines delivered", *delivered, "", "", ""])
        for label, summary, key in (
            ("delay p50 (ms)", "delay", "p50_ms"),
            ("delay p99 (ms)", "delay", "p99_ms"),
            ("delay p99 with start-up (ms)", "delay_all", "p99_ms"),
        ):
            rows.append(
                _compared_rows(
                    by_target,
                    label,
                    lambda result, summary=summary, key=key: result[summary][key],
                    prefix,
                    digits=3,
                )
            )
        rows.append(
            _proxy_rows(
                by_target,
                "proxy CPU (% of one core)",
                lambda result: result.get("proxy_cpu_percent"),
                prefix,
            )
        )
        rows.append(
            _proxy_rows(by_target, "proxy CPU per line (µs)", _cpu_per_line, prefix)
        )
    header = ["streams", "figure", "direct", "exoproxy", "nginx"]
    header += ["exoproxy − direct", "nginx − direct", "exoproxy / nginx"]
    return lines + _table(header, rows)


def _saturation_section(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    saturation = results["saturation"]
    lines = [
        "### Saturation: the most NDJSON lines/s relayed",
        "",
        f"{settings['saturation_streams']} streams; the offered rate rises step by "
        f"step ({settings['saturation_seconds']:g} s each) until a step is not kept "
        f"up: a step is kept up when every line arrives and the p99 delay is at "
        f"most {settings['saturation_p99_ms']:g} ms. The direct figure is the limit "
        "of the load side (upstream and load generator on one CPU).",
        "",
    ]

    def figure(name: str, key: str) -> float | None:
        return saturation[name][key] if name in saturation else None

    rows = []
    for label, key in (
        ("max offered lines/s kept up", "max_kept_up_lines_per_s"),
        ("max lines/s delivered in one step", "max_delivered_lines_per_s"),
    ):
        values = {name: figure(name, key) for name in ("direct", *_PROXIES)}
        rows.append(
            [
                label,
                *(_number(values[name], 0) for name in ("direct", *_PROXIES)),
                _ratio(values["exoproxy"], values["direct"]),
                _ratio(values["exoproxy"], values["nginx"]),
            ]
        )

    def limit_found(name: str) -> str:
        if name not in saturation:
            return "–"
        if saturation[name]["limit_found"]:
            return "yes"
        return "no: the last step was kept up"

    ended = [limit_found(name) for name in ("direct", *_PROXIES)]
    rows.append(["ramp found a limit", *ended, "", ""])

    cpu = {}
    for name in _PROXIES:
        step = _last_kept_up_step(saturation, name)
        cpu[name] = _cpu_per_line(step) if step else None
    rows.append(
        [
            "proxy CPU per line at its last kept-up step (µs)",
            "–",
            _number(cpu["exoproxy"], 1),
            _number(cpu["nginx"], 1),
            "",
            _ratio(cpu["exoproxy"], cpu["nginx"]),
        ]
    )
    estimate = {name: _estimated_capacity(saturation, name) for name in _PROXIES}
    rows.append(
        [
            "estimate: lines/s at 100 % of one core (1 / CPU per line)",
            "–",
            _number(estimate["exoproxy"], 0),
            _number(estimate["nginx"], 0),
            "",
            _ratio(estimate["exoproxy"], estimate["nginx"]),
        ]
    )
    header = ["figure", "direct", "exoproxy", "nginx"]
    header += ["exoproxy / direct", "exoproxy / nginx"]
    return lines + _table(header, rows)


def _case_label(case: str) -> str:
    clients, rate = case.split("@")
    noun = "client" if clients == "1" else "clients"
    if float(rate) == 0:
        return f"{clients} {noun}, back-to-back"
    total = int(clients) * float(rate)
    return f"{clients} {noun}, {rate} req/s each ({total:,.0f} req/s)"


def _small_section(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    lines = [
        "### Small requests: non-streamed `/api/show`, "
        f"{settings['small_seconds']:g} s",
        "",
        "Each client sends one request at a time over a keep-alive connection, "
        "either back-to-back or on a fixed schedule. A scheduled request that had "
        "to wait for a late response counts from its scheduled time. Back-to-back "
        "clients keep the target busy, so their latency is mostly queueing at its "
        "throughput limit. The difference columns are the latency that each proxy "
        "adds.",
        "",
    ]
    rows = []
    for case, by_target in results["small"].items():
        prefix = [_case_label(case)]
        rows.append(
            _compared_rows(
                by_target,
                "requests/s",
                lambda result: result["requests_per_s"],
                prefix,
                digits=0,
            )
        )
        for label, key in (
            ("latency p50 (ms)", "p50_ms"),
            ("latency p99 (ms)", "p99_ms"),
        ):
            rows.append(
                _compared_rows(
                    by_target,
                    label,
                    lambda result, key=key: result["latency"][key],
                    prefix,
                    digits=3,
                )
            )
    header = ["clients", "figure", "direct", "exoproxy", "nginx"]
    header += ["exoproxy − direct", "nginx − direct", "exoproxy / nginx"]
    return lines + _table(header, rows)


def _memory_section(results: dict[str, Any]) -> list[str]:
    memory = results.get("memory", {})
    upload = results.get("upload", {})
    size = results["settings"]["upload_bytes"]
    concurrency = max(results["settings"]["concurrencies"])
    lines = [
        "### Memory: RSS of the proxy process (nginx: master and worker), MiB",
        "",
    ]

    def mib(name: str, key: str) -> float | None:
        value = memory.get(name, {}).get(key)
        return value / _MIB if value is not None else None

    def growth(name: str) -> float | None:
        before, during = mib(name, "upload_before"), mib(name, "upload")
        return during - before if before is not None and during is not None else None

    rows = []
    for label, key in (
        ("idle, after start and warm-up", "idle"),
        (f"{concurrency} open streams (max)", "streams"),
        (f"{size / 2**30:g} GiB blob upload (max)", "upload"),
        ("idle, after the whole run", "idle_after"),
    ):
        values = [mib(name, key) for name in _PROXIES]
        rows.append([label, *(_number(value, 1) for value in values), _ratio(*values)])
    growths = [growth(name) for name in _PROXIES]
    rows.append(
        ["growth during the upload", *(_signed(value) for value in growths), ""]
    )
    lines += _table(["state", "exoproxy", "nginx", "exoproxy / nginx"], rows)

    if upload:
        throughput = {name: upload[name].get("mib_per_s") for name in upload}
        status = {name: upload[name].get("status") for name in upload}
        lines += _table(
            ["upload", "direct", "exoproxy", "nginx", "exoproxy / nginx"],
            [
                [
                    "throughput (MiB/s)",
                    *(_number(throughput.get(n), 0) for n in ("direct", *_PROXIES)),
                    _ratio(throughput.get("exoproxy"), throughput.get("nginx")),
                ],
                [
                    "status",
                    *(str(status.get(n, "–")) for n in ("direct", *_PROXIES)),
                    "",
                ],
            ],
        )
    return lines


def _coldstart_section(results: dict[str, Any]) -> list[str]:
    coldstart = results["coldstart"]
    runs = coldstart["runs"]
    poll = coldstart["poll_interval_s"]
    boot_delays = ", ".join(f"{run['boot_delay_s']:.2f}" for run in runs)
    cold = [run["cold_start_s"] for run in runs]
    rows = [
        ["runs (simulated boot delay, s)", f"{len(runs)} ({boot_delays})"],
        [
            "daemon poll interval",
            "the daemon's default (1 s)" if poll is None else f"{poll:g} s",
        ],
        [
            "simulated Ollama lists the model → `/status` says ready, mean (s)",
            _number(coldstart["lag_mean_s"], 3),
        ],
        [
            "simulated Ollama lists the model → `/status` says ready, max (s)",
            _number(coldstart["lag_max_s"], 3),
        ],
        [
            "first request → `/status` says ready, mean (s)",
            _number(sum(cold) / len(cold)),
        ],
        [
            f"Exoscale API calls during {coldstart['ready_requests']} proxied "
            "requests in the ready state",
            str(coldstart["api_calls_in_ready_state"]),
        ],
    ]
    return [
        "### Cold start on the simulated cloud",
        "",
        "The daemon runs in-process with `--simulate`; the simulator counts the API "
        "calls. The lag depends on where the model's arrival falls in the daemon's "
        "readiness poll cycle, so the runs move it through the cycle by changing "
        "the simulated boot delay.",
        "",
        *_table(["figure", "value"], rows),
    ]


def _targets_section(results: dict[str, Any]) -> list[str]:
    rows = []

    def verdict(passed: bool) -> str:
        if passed:
            return "met"
        return "missed"

    streams = results.get("streams", {})
    largest = str(max(results["settings"]["concurrencies"]))
    if largest in streams and "exoproxy" in streams[largest]:
        exoproxy = streams[largest]["exoproxy"]
        direct = streams[largest]["direct"]
        every_line = exoproxy["delivered_lines"] == exoproxy["expected_lines"]
        added = exoproxy["delay"]["p99_ms"] - direct["delay"]["p99_ms"]
        rows.append(
            [
                f"{largest} streams: every line delivered",
                f"{exoproxy['delivered_lines']}/{exoproxy['expected_lines']}",
                verdict(every_line),
            ]
        )
        rows.append(
            [
                f"{largest} streams: p99 added delay ≤ 10 ms",
                f"{added:.2f} ms",
                verdict(added <= 10),
            ]
        )
    for case, by_target in results.get("small", {}).items():
        if "exoproxy" in by_target:
            added = (
                by_target["exoproxy"]["latency"]["p50_ms"]
                - by_target["direct"]["latency"]["p50_ms"]
            )
            rows.append(
                [
                    f"small requests, {_case_label(case)}: p50 added latency ≤ 1 ms",
                    f"{added:.3f} ms",
                    verdict(added <= 1),
                ]
            )
    saturation = results.get("saturation", {})
    if "exoproxy" in saturation and "nginx" in saturation:
        exoproxy = saturation["exoproxy"]["max_kept_up_lines_per_s"]
        nginx = saturation["nginx"]["max_kept_up_lines_per_s"]
        measured = f"{_ratio(exoproxy, nginx)} of nginx"
        direct = saturation.get("direct", {}).get("max_kept_up_lines_per_s")
        if not saturation["nginx"]["limit_found"] or nginx == direct:
            # nginx kept up with all that the load side could offer, so its own
            # limit is higher than measured and the ratio is an upper bound.
            measured += " (nginx limited by the load side)"
        rows.append(
            [
                "saturation, measured: at least half of nginx's lines/s",
                measured,
                verdict(bool(nginx) and exoproxy >= nginx / 2),
            ]
        )
        estimates = {name: _estimated_capacity(saturation, name) for name in _PROXIES}
        if estimates["exoproxy"] and estimates["nginx"]:
            rows.append(
                [
                    "saturation, estimated from CPU per line: at least half of "
                    "nginx's lines/s",
                    f"{_ratio(estimates['exoproxy'], estimates['nginx'])} of nginx",
                    verdict(estimates["exoproxy"] >= estimates["nginx"] / 2),
                ]
            )
    memory = results.get("memory", {}).get("exoproxy", {})
    if "upload" in memory and memory.get("upload_before") is not None:
        growth = memory["upload"] - memory["upload_before"]
        rows.append(
            [
                f"blob upload: RSS grows by at most {_UPLOAD_GROWTH_LIMIT // _MIB} MiB",
                f"{growth / _MIB:+.1f} MiB",
                verdict(growth <= _UPLOAD_GROWTH_LIMIT),
            ]
        )
    if "coldstart" in results:
        calls = results["coldstart"]["api_calls_in_ready_state"]
        rows.append(
            ["no Exoscale API call in the ready state", str(calls), verdict(calls == 0)]
        )
    return ["### Targets", "", *_table(["target", "measured", "verdict"], rows)]


def _load_side_section(results: dict[str, Any]) -> list[str]:
    lines = ["### Load side and background load", ""]
    saturation = results.get("saturation", {}).get("direct")
    largest = str(max(results["settings"]["concurrencies"]))
    direct = results.get("streams", {}).get(largest, {}).get("direct")
    if saturation:
        lines.append(
            f"- Direct, the load side kept up with "
            f"{_number(saturation['max_kept_up_lines_per_s'], 0)} lines/s "
            f"(most delivered in one step: "
            f"{_number(saturation['max_delivered_lines_per_s'], 0)} lines/s)."
        )
    if direct:
        load_cpu = direct["loadgen_cpu_s"] + direct["upstream_cpu_s"]
        lines.append(
            f"- With {largest} direct streams, the upstream and the load generator "
            f"used {100 * load_cpu / direct['wall_s_sampled']:.0f} % of their CPU."
        )
    other = [
        result["other_cpu_s"]
        for section in ("streams", "small")
        for by_target in results.get(section, {}).values()
        for result in by_target.values()
    ]
    if other:
        lines.append(
            f"- Other processes of the machine used {max(other):.2f} CPU-seconds at "
            "most during one stream or small-request measurement "
            f"({sum(other):.2f} s in all)."
        )
    return lines + [""]


def render(results: dict[str, Any], plot: Path | None, out: Path) -> str:
    """
    Return the Markdown of one run, between the markers.
    """
    lines = [BEGIN, "", f"## Run of {results['started']}", ""]
    if results["quick"]:
        lines += ["This is a --quick run: its sizes only check the harness.", ""]
    lines += _header(results)
    if "streams" in results:
        lines += _streams_section(results)
    if plot is not None and plot.exists():
        relative = _relative(plot, out.parent)
        lines += [f"![Per-line delay against concurrency]({relative})", ""]
    if "saturation" in results:
        lines += _saturation_section(results)
    if "small" in results:
        lines += _small_section(results)
    if "memory" in results:
        lines += _memory_section(results)
    if "coldstart" in results:
        lines += _coldstart_section(results)
    lines += _targets_section(results)
    lines += _load_side_section(results)
    lines.append(END)
    return "\n".join(lines) + "\n"


def _relative(path: Path, start: Path) -> str:
    try:
        return str(path.resolve().relative_to(start.resolve()))
    except ValueError:
        return str(path.resolve())


def write_report(results: dict[str, Any], out: Path, plot: Path | None) -> None:
    """
    Write the report to `out`, keeping the text outside the markers if the file
    has them.
    """
    section = render(results, plot, out)
    if out.exists():
        text = out.read_text()
        if BEGIN in text and END in text:
            before = text.split(BEGIN, 1)[0]
            after = text.split(END, 1)[1].lstrip("\n")
            out.write_text(before + section + ("\n" + after if after else ""))
            return
    title = "# exoproxy benchmarks\n\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(title + section)


def write_plot(results: dict[str, Any], path: Path) -> None:
    """
    Plot the p50 and p99 per-line delay against concurrency for each target.

    Raises:
        RuntimeError: matplotlib is not installed; it is in the `bench` extra.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install '.[bench]'") from None

    streams = results.get("streams", {})
    concurrencies = sorted(int(key) for key in streams)
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"direct": "tab:gray", "exoproxy": "tab:blue", "nginx": "tab:green"}
    for name in results["configs"]:
        for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
            values = [streams[str(c)][name]["delay"][key] for c in concurrencies]
            axes.plot(
                concurrencies,
                values,
                style,
                marker="o",
                color=colors[name],
                label=f"{name} {key.removesuffix('_ms')}",
            )
    rate = results["settings"]["stream_rate"]
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(concurrencies, [str(c) for c in concurrencies])
    axes.set_xlabel(f"concurrent /api/chat streams ({rate:g} lines/s each)")
    axes.set_ylabel("delay per line (ms), upstream write to client read")
    axes.set_title("Per-line delay against concurrency")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
