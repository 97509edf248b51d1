#!/usr/bin/env bash
# Web role: gunicorn serving Django (API, dashboard, admin, /metrics, /healthz, /readyz).
# The image, `make dev`, the tests, bench and chaos all start the web role with this script.
#
# Environment:
#   MAILROOM_WEB_BIND        address to listen on (default 0.0.0.0:8000)
#   WEB_CONCURRENCY          gunicorn worker processes (default 2); size it to the CPU limit,
#                            not to the host: gunicorn cannot see a container's CPU quota
#   MAILROOM_WEB_ACCESS_LOG  where gunicorn writes its access log (default -, stdout);
#                            empty: no access log
#   GUNICORN_CMD_ARGS        any other gunicorn flag (read by gunicorn itself)
#   MAILROOM_PYTHON          the Python to run (default: the virtualenv beside deploy/, i.e.
#                            /app/.venv in the image and .venv in a checkout; else python3)
# Settings come from the environment too (messaging_platform/settings.py). Each web worker
# runs the system checks as it loads the app (messaging_platform/checks.py): a bad setting
# stops gunicorn at start ("Worker failed to boot"), naming the variable.
#
# gunicorn is exec'd: it becomes this process, so SIGTERM reaches the master directly and it
# stops its workers gracefully (--graceful-timeout; keep the orchestrator's grace above it).
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"
# The virtualenv beside deploy/: /app/.venv in the image, .venv in a checkout.
python="${MAILROOM_PYTHON:-$DEPLOY_DIR/../.venv/bin/python}"
[[ -n "${MAILROOM_PYTHON:-}" || -x "$python" ]] || python=python3

options=()
# The workers' heartbeat files on tmpfs (a container's /tmp may be a slow overlay); gunicorn's
# own default where there is no /dev/shm (macOS).
[[ -d /dev/shm ]] && options+=(--worker-tmp-dir /dev/shm)
access_log="${MAILROOM_WEB_ACCESS_LOG--}"
[[ -n "$access_log" ]] && options+=(--access-logfile "$access_log")

exec "$python" -m gunicorn messaging_platform.wsgi:application \
    --config "$DEPLOY_DIR/gunicorn.conf.py" \
    --bind "${MAILROOM_WEB_BIND:-0.0.0.0:8000}" \
    --workers "${WEB_CONCURRENCY:-2}" \
    --graceful-timeout 30 \
    --no-control-socket \
    "${options[@]}"
