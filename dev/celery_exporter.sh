#!/usr/bin/env bash
# Run danihodovic's celery-exporter (PyPI prometheus-exporter-celery): task-level metrics
# from Celery's events plus queue lengths from the broker, on /metrics.
#
# The package pins redis<6 and prometheus-client<0.22, which conflict with Mailroom's own
# dependencies, so it lives in its own virtualenv, .tools/celery-exporter at the repo root
# (gitignored), created and filled on first use. It ships its code as a top-level package
# named `src` with no console script, hence the `python -c`.
#
# Environment: CELERY_BROKER_URL (default: REDIS_URL, as in Mailroom's settings),
# CELERY_EXPORTER_PORT (default 9808), CELERY_EXPORTER_HOST (default 127.0.0.1; use 0.0.0.0
# in a container). Extra arguments are passed on to the exporter (see --help).
set -o errexit -o pipefail -o nounset

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# celery-exporter only pins redis<6, while kombu 5.6 and later refuse any redis-py before
# 6.1: hold Celery, kombu and redis-py at the last versions that go together.
PACKAGES=(prometheus-exporter-celery==0.11.2 celery==5.5.3 kombu==5.5.4 redis==5.2.1)
VENV="$REPO/.tools/celery-exporter"
PYTHON="$VENV/bin/python"
MARKER="$VENV/.installed"
# Queues whose length is reported even before a worker consuming them has been seen.
QUEUES="high_priority,bulk"

find_uv() {
    if command -v uv >/dev/null 2>&1; then
        command -v uv
    elif [[ -x "$REPO/.tools/bin/uv" ]]; then
        echo "$REPO/.tools/bin/uv"
    fi
}

install_exporter() {
    local uv
    uv="$(find_uv)"
    echo "celery_exporter.sh: installing ${PACKAGES[*]} into $VENV (first run only)" >&2
    if [[ -n "$uv" ]]; then
        [[ -x "$PYTHON" ]] || "$uv" venv --quiet --python python3 "$VENV"
        "$uv" pip install --quiet --python "$PYTHON" "${PACKAGES[@]}"
    else
        [[ -x "$PYTHON" ]] || python3 -m venv "$VENV"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
    fi
    # Written last, so an interrupted install is retried on the next run.
    echo "${PACKAGES[*]}" >"$MARKER"
}

if [[ ! -x "$PYTHON" || "$(cat "$MARKER" 2>/dev/null)" != "${PACKAGES[*]}" ]]; then
    install_exporter
fi

# Celery's Django fix-up would warn about this variable: the exporter needs no Django.
unset DJANGO_SETTINGS_MODULE
exec "$PYTHON" -I -u -c 'from src.cli import cli; cli()' \
    --broker-url="${CELERY_BROKER_URL:-${REDIS_URL:-redis://127.0.0.1:6379/0}}" \
    --host "${CELERY_EXPORTER_HOST:-127.0.0.1}" \
    --port "${CELERY_EXPORTER_PORT:-9808}" \
    --queues "$QUEUES" \
    --retry-interval 5 \
    "$@"
