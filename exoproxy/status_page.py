"""
The `/status` page for a person with a browser: the same facts as the JSON document,
as one small HTML page with inline CSS and no scripts.
"""

from __future__ import annotations

from html import escape
from typing import Any

from twisted.web.server import Request

# Seconds between reloads of the page while the instance changes state.
REFRESH_SECONDS = 3

# The next step after each phase of a provisioning run or of the lifecycle.
_NEXT_STEP = {
    "idle": "A request that needs the model starts the instance.",
    "stopped": "A request that needs the model starts the instance again.",
    "finding instance": "Start the instance that was found, or create one.",
    "creating instance": "Wait for the new instance to boot.",
    "starting instance": "Wait for the instance to boot.",
    "waiting for the instance to stop": "Start the instance again.",
    "waiting for boot": "Wait for Ollama on the instance to answer.",
    "waiting for ollama": "Wait until Ollama lists the model; then requests go "
    "through.",
    "pulling model": "Ollama is downloading the model; then requests go through.",
    "stopping": "The instance stops; a request after that starts it again.",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 40rem;
       padding: 0 1rem; color: #222; background: #fafafa; }
h1 { font-size: 1.4rem; }
.state { display: inline-block; padding: 0.2rem 0.6rem; border-radius: 0.3rem;
         color: #fff; background: #666; }
.state.ready { background: #2a7d2a; }
.state.provisioning, .state.stopping { background: #b07a00; }
.state.error { background: #b02a2a; }
table { border-collapse: collapse; margin-top: 1rem; width: 100%; }
th, td { text-align: left; padding: 0.3rem 0.6rem; border-bottom: 1px solid #ddd;
         vertical-align: top; }
th { width: 12rem; font-weight: 600; }
"""


def _quality(media_range: str) -> tuple[str, float]:
    kind, *parameters = (part.strip() for part in media_range.split(";"))
    quality = 1.0
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                quality = float(value)
            except ValueError:
                quality = 0.0
    return kind.lower(), quality


def _accepted(accept: str, media_type: str) -> float:
    """
    Return the quality that an Accept header gives C{media_type}, from the most
    specific media range that matches it.
    """
    main_type = media_type.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)
    for media_range in accept.split(","):
        if not media_range.strip():
            continue
        kind, quality = _quality(media_range)
        if kind == media_type:
            specificity = 2
        elif kind == f"{main_type}/*":
            specificity = 1
        elif kind == "*/*":
            specificity = 0
        else:
            continue
        if specificity > best[0]:
            best = (specificity, quality)
    return best[1]


def prefers_html(request: Request) -> bool:
    """
    Return whether the client's Accept header ranks text/html above JSON. Without
    the header, or with equal ranks (such as curl's "*/*"), the client gets JSON.
    """
    accept = (request.getHeader(b"accept") or b"").decode("latin-1")
    if not accept:
        return False
    return _accepted(accept, "text/html") > _accepted(accept, "application/json")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


def _next_step(status: dict[str, Any]) -> str:
    # The daemon's own description of its next action wins where /status has one.
    if status.get("next_action"):
        next_action = str(status["next_action"])
        return next_action[:1].upper() + next_action[1:]

    state = status.get("provisioning_status")
    if state == "ready":
        if "idle_stop_in" not in status:
            return "Requests go to Ollama."
        countdown = status["idle_stop_in"]
        if countdown is None:
            return "The idle countdown starts when the last request in flight ends."
        action = "stops" if status.get("idle_action") == "stop" else "is destroyed"
        return (
            f"The instance {action} in {_duration(countdown)} unless a request arrives."
        )
    if state == "error":
        retry_in = status.get("retry_in")
        if retry_in:
            return f"A request after {_duration(retry_in)} tries again."
        return "The next request tries again."
    phase = status.get("phase", "")
    return _NEXT_STEP.get(phase, _NEXT_STEP.get(state or "", ""))


def _rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("Phase", str(status.get("phase", "")))]
    if "phase_seconds" in status:
        rows.append(("In this phase for", _duration(status["phase_seconds"])))
    rows.append(("Next", _next_step(status)))
    if status.get("provisioning_status") == "ready" and "idle_stop_in" in status:
        countdown = status["idle_stop_in"]
        rows.append(
            (
                "Idle countdown",
                (
                    "paused while requests are in flight"
                    if countdown is None
                    else _duration(countdown)
                ),
            )
        )
    if status.get("error"):
        rows.append(("Last error", str(status["error"])))
    for label, key in (
        ("Instance", "instance_id"),
        ("Instance state", "instance_status"),
        ("Backend", "remote_url"),
        ("Requests in flight", "requests_in_flight"),
        ("Last activity", "last_activity"),
        ("Model", "ollama_model"),
        ("Instance type", "instance_type"),
        ("Zone", "zone"),
        ("Idle timeout", "idle_timeout"),
        ("Idle action", "idle_action"),
        ("Mode", "mode"),
    ):
        value = status.get(key)
        if value is None:
            continue
        if key == "idle_timeout":
            value = _duration(value)
        rows.append((label, str(value)))
    return rows


def render_status_page(status: dict[str, Any]) -> bytes:
    """
    Render the `/status` document as an HTML page. Every value is escaped.

    The page reloads itself every few seconds while the state is provisioning or
    stopping, and stays still otherwise.
    """
    state = str(status.get("provisioning_status", "unknown"))
    refresh = ""
    if state in ("provisioning", "stopping"):
        refresh = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">\n'
    simulated = " (simulated cloud)" if status.get("simulated") else ""

    rows = "\n".join(
        f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>"
        for label, value in _rows(status)
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh}<title>exoproxy: {escape(state)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>exoproxy{escape(simulated)}</h1>
<p><span class="state {escape(state, quote=True)}">{escape(state)}</span></p>
<table>
{rows}
</table>
</body>
</html>
"""
    return page.encode("utf-8")
