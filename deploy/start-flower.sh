#!/usr/bin/env bash
# Flower role: Celery's web monitor, behind HTTP basic auth.
#
# Environment (Flower reads its FLOWER_* variables itself, so the password never shows up in
# the process list):
#   FLOWER_BASIC_AUTH  user:password[,user2:password2]; required
#   FLOWER_PORT        default 5555
#   FLOWER_ADDRESS     default 0.0.0.0
#   MAILROOM_PYTHON    the Python to run (default: the virtualenv beside deploy/, /app/.venv
#                      in the image and .venv in a checkout; else python3)
# Flower serves /metrics and /healthcheck without auth: keep its port on an internal network.
# It runs no system checks: it sends no mail, and it should stay up to show the workers that
# a bad setting stopped.
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"
# The virtualenv beside deploy/: /app/.venv in the image, .venv in a checkout.
python="${MAILROOM_PYTHON:-$DEPLOY_DIR/../.venv/bin/python}"
[[ -n "${MAILROOM_PYTHON:-}" || -x "$python" ]] || python=python3

if [[ -z "${FLOWER_BASIC_AUTH:-}" ]]; then
    echo "start-flower.sh: set FLOWER_BASIC_AUTH=user:password (Flower can pause nothing, but it shows every task)" >&2
    exit 64
fi
export FLOWER_PORT="${FLOWER_PORT:-5555}"
export FLOWER_ADDRESS="${FLOWER_ADDRESS:-0.0.0.0}"

# Workers that left (scaled in, replaced) disappear from the list after ten minutes.
exec "$python" -m celery --app messaging_platform flower --purge_offline_workers=600
