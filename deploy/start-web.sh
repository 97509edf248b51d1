#!/usr/bin/env bash
# Web role: gunicorn serving Django (API, dashboard, admin, /metrics, /healthz, /readyz).
#
# Environment:
#   MAILROOM_WEB_BIND   address to listen on (default 0.0.0.0:8000)
#   WEB_CONCURRENCY     gunicorn worker processes (default 2); size it to the CPU limit,
#                       not to the host: gunicorn cannot see a container's CPU quota
#   GUNICORN_CMD_ARGS   any other gunicorn flag (read by gunicorn itself)
# Settings come from the environment too (messaging_platform/settings.py).
#
# gunicorn is exec'd: it becomes this process, so SIGTERM reaches the master directly and it
# stops its workers gracefully (--graceful-timeout; keep the orchestrator's grace above it).
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"

exec gunicorn messaging_platform.wsgi:application \
    --config "$DEPLOY_DIR/gunicorn.conf.py" \
    --bind "${MAILROOM_WEB_BIND:-0.0.0.0:8000}" \
    --workers "${WEB_CONCURRENCY:-2}" \
    --graceful-timeout 30 \
    --worker-tmp-dir /dev/shm \
    --no-control-socket \
    --access-logfile -
