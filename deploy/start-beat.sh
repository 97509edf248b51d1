#!/usr/bin/env bash
# Beat role: Celery beat, the scheduler of the sweeper and the campaign dispatcher.
# Run exactly one: two beats would send every periodic task twice.
#
# Environment:
#   MAILROOM_BEAT_SCHEDULE  schedule file (default /tmp/celerybeat-schedule); losing it costs
#                           nothing (every entry is a short interval). deploy/healthcheck.py
#                           `beat` checks that beat keeps writing it
#   LOG_LEVEL               default INFO (every sent task is logged at INFO)
#
# Beat is exec'd, so SIGTERM reaches it directly: it saves the schedule and exits.
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"

exec celery --app messaging_platform beat \
    --schedule "${MAILROOM_BEAT_SCHEDULE:-/tmp/celerybeat-schedule}" \
    --loglevel "${LOG_LEVEL:-INFO}"
