#!/usr/bin/env bash
# Wait until the database schema is up to date (the migrate one-shot has run), so that a new
# release never serves requests or runs tasks against the old schema. Used as the Kubernetes
# init container of every role that touches the database.
#
# Environment: MAILROOM_MIGRATIONS_TIMEOUT seconds to wait (default 600), then fail;
# MAILROOM_PYTHON, the Python to run (default: the virtualenv beside deploy/, /app/.venv in
# the image and .venv in a checkout; else python3).
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"
# The virtualenv beside deploy/: /app/.venv in the image, .venv in a checkout.
python="${MAILROOM_PYTHON:-$DEPLOY_DIR/../.venv/bin/python}"
[[ -n "${MAILROOM_PYTHON:-}" || -x "$python" ]] || python=python3

# A setting that no role can work with (messaging_platform/checks.py) fails here at once,
# naming the variable, instead of passing for unapplied migrations until the deadline.
"$python" manage.py check --fail-level ERROR >/dev/null

deadline=$((SECONDS + ${MAILROOM_MIGRATIONS_TIMEOUT:-600}))
# `migrate --check` exits non-zero while any migration is unapplied (or the database is down).
until "$python" manage.py migrate --check >/dev/null; do
    if ((SECONDS >= deadline)); then
        echo "wait-for-migrations.sh: the schema is still not up to date; is the migrate job running?" >&2
        exit 1
    fi
    echo "wait-for-migrations.sh: waiting for migrations" >&2
    sleep 5
done
echo "wait-for-migrations.sh: the schema is up to date"
