# exoproxy: an Ollama-compatible HTTP API on port 11434 that runs the model on an
# Exoscale GPU instance, started on demand and stopped when idle.
#
#   docker build -t exoproxy .
#   docker run -p 11434:11434 -e EXOSCALE_API_KEY -e EXOSCALE_API_SECRET exoproxy
#
# Arguments after the image name are options of `twistd exoproxy`, for example
# `--listen tcp:11434` or `--simulate`. `docker run exoproxy --help` lists them all.
#
# Main environment variables (each option has one; --help names it and its default):
#   EXOSCALE_API_KEY        Exoscale API key. Required unless --simulate is given.
#   EXOSCALE_API_SECRET     Exoscale API secret. Pass it at run time, never in the
#                           image. EXOSCALE_API_SECRET_FILE names a file to read it
#                           from instead, such as a Docker secret under /run/secrets.
#   EXOSCALE_ZONE           Zone of the GPU instance, such as at-vie-2.
#   EXOSCALE_INSTANCE_TYPE  Instance type as FAMILY.SIZE, such as a5000.small.
#   EXOSCALE_TEMPLATE       Name of the template that the instance boots, such as
#                           "Linux Ubuntu 24.04 LTS 64-bit".
#   EXOSCALE_DISK_SIZE      Instance disk size, in GiB.
#   EXOSCALE_IDLE_TIMEOUT   Seconds without a request before the instance is stopped.
#   OLLAMA_MODEL            Model that the instance pulls, such as llama3.2:1b.
#   EXOPROXY_LISTEN         Twisted endpoints to listen on, separated by spaces.
#                           The default, tcp:11434, listens on all interfaces.
#   EXOPROXY_LOG_FORMAT     text (the default) or json: one JSON object per line
#                           on standard output, for a log shipper.
#   EXOPROXY_METRICS_LISTEN Endpoints that serve only /metrics (Prometheus),
#                           such as tcp:9464; without it the main port serves it.
# The image sets none of them, so the defaults of `twistd exoproxy` apply.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml setup.cfg README.md /src/
COPY exoproxy /src/exoproxy
COPY twisted /src/twisted

# Install the package without its test extra. Twisted writes its plugin cache next
# to the plugins on first discovery, and the non-root user cannot write there, so the
# cache is built here.
RUN pip install /src \
    && rm -rf /src \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

RUN useradd --system --uid 10001 --user-group --create-home \
    --home-dir /var/lib/exoproxy --shell /usr/sbin/nologin exoproxy

USER exoproxy
WORKDIR /var/lib/exoproxy

EXPOSE 11434

# Python's standard library, because the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:11434/', timeout=4)"]

ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "exoproxy"]
