#!/usr/bin/env bash
# Flower role: Celery's web monitor, behind HTTP basic auth.
#
# Environment (Flower reads its FLOWER_* variables itself, so the password never shows up in
# the process list):
#   FLOWER_BASIC_AUTH  user:password[,user2:password2]; required
#   FLOWER_PORT        default 5555
#   FLOWER_ADDRESS     default 0.0.0.0
# Flower serves /metrics and /healthcheck without auth: keep its port on an internal network.
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"

if [[ -z "${FLOWER_BASIC_AUTH:-}" ]]; then
    echo "start-flower.sh: set FLOWER_BASIC_AUTH=user:password (Flower can pause nothing, but it shows every task)" >&2
    exit 64
fi
export FLOWER_PORT="${FLOWER_PORT:-5555}"
export FLOWER_ADDRESS="${FLOWER_ADDRESS:-0.0.0.0}"

# Workers that left (scaled in, replaced) disappear from the list after ten minutes.
exec celery --app messaging_platform flower --purge_offline_workers=600
