#!/usr/bin/env bash
# Beat role: Celery beat, the scheduler of the sweeper and the campaign dispatcher.
# Run exactly one: two beats would send every periodic task twice.
#
# Environment:
#   MAILROOM_BEAT_SCHEDULE  schedule file (default /tmp/celerybeat-schedule); losing it costs
#                           nothing (every entry is a short interval). deploy/healthcheck.py
#                           `beat` checks that beat keeps writing it
#   LOG_LEVEL               default INFO (every sent task is logged at INFO)
#   MAILROOM_PYTHON         the Python to run (default: the virtualenv beside deploy/,
#                           /app/.venv in the image and .venv in a checkout; else python3)
# Beat checks the settings as it starts (messaging_platform/checks.py) and exits with
# status 1, naming the variable, before it schedules anything. The image, `make dev`, the
# tests, bench and chaos all start beat with this script.
#
# Beat is exec'd, so SIGTERM reaches it directly: it saves the schedule and exits.
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"
# The virtualenv beside deploy/: /app/.venv in the image, .venv in a checkout.
python="${MAILROOM_PYTHON:-$DEPLOY_DIR/../.venv/bin/python}"
[[ -n "${MAILROOM_PYTHON:-}" || -x "$python" ]] || python=python3

exec "$python" -m celery --app messaging_platform beat \
    --schedule "${MAILROOM_BEAT_SCHEDULE:-/tmp/celerybeat-schedule}" \
    --loglevel "${LOG_LEVEL:-INFO}"
