#!/usr/bin/env bash
# Worker role: one Celery worker pool, `high_priority` (transactional) or `bulk` (campaigns).
# The image, `make dev`, the tests, bench and chaos all start workers with this script.
#
# Environment:
#   MAILROOM_WORKER_QUEUE        the queue(s) to consume: high_priority, bulk, or both
#                                comma-separated (the smallest deployment); required
#   MAILROOM_WORKER_CONCURRENCY  prefork processes (default 2). Always passed as -c: Celery's
#                                own default is the host's CPU count, not the container's
#                                limit (celery/celery#10320)
#   MAILROOM_WORKER_MAX_TASKS_PER_CHILD  recycle a process after this many tasks (default 1000)
#   MAILROOM_WORKER_HEARTBEAT_FILE       liveness file the worker touches every 10 s
#                                (default /tmp/mailroom-worker-heartbeat); deploy/healthcheck.py
#                                `worker` checks it
#   MAILROOM_WORKER_NAME         the node name (default <queues>@%h, e.g. bulk@%h); two
#                                workers on one host need different names
#   LOG_LEVEL                    default INFO
#   MAILROOM_PYTHON              the Python to run (default: the virtualenv beside deploy/,
#                                /app/.venv in the image and .venv in a checkout; else python3)
# The worker checks the settings as it starts (messaging_platform/checks.py) and exits with
# status 1, naming the variable, before it takes a task.
#
# Celery is exec'd: it becomes this process, so SIGTERM starts Celery's warm shutdown (running
# tasks finish, reserved ones go back to the queue). Give it longer than
# CELERY_TASK_TIME_LIMIT before the SIGKILL (stop_grace_period, terminationGracePeriodSeconds).
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"
# The virtualenv beside deploy/: /app/.venv in the image, .venv in a checkout.
python="${MAILROOM_PYTHON:-$DEPLOY_DIR/../.venv/bin/python}"
[[ -n "${MAILROOM_PYTHON:-}" || -x "$python" ]] || python=python3

queues="${MAILROOM_WORKER_QUEUE:-}"
IFS=, read -r -a names <<<"$queues"
if ((${#names[@]} == 0)); then
    echo "start-worker.sh: set MAILROOM_WORKER_QUEUE to high_priority, bulk or high_priority,bulk" >&2
    exit 64
fi
for name in "${names[@]}"; do
    if [[ "$name" != high_priority && "$name" != bulk ]]; then
        echo "start-worker.sh: unknown queue '$name' in MAILROOM_WORKER_QUEUE=$queues" >&2
        exit 64
    fi
done
concurrency="${MAILROOM_WORKER_CONCURRENCY:-2}"
if [[ ! "$concurrency" =~ ^[1-9][0-9]*$ ]]; then
    echo "start-worker.sh: MAILROOM_WORKER_CONCURRENCY must be a positive integer, got '$concurrency'" >&2
    exit 64
fi

# A file left by an earlier run of this container must not pass for a live worker.
export MAILROOM_WORKER_HEARTBEAT_FILE="${MAILROOM_WORKER_HEARTBEAT_FILE:-/tmp/mailroom-worker-heartbeat}"
rm -f "$MAILROOM_WORKER_HEARTBEAT_FILE"

# Gossip and mingle are worker-to-worker chatter that grows with the number of pods and that
# Mailroom does not use (no revokes: pause and cancel live in the database).
exec "$python" -m celery --app messaging_platform worker \
    --queues "$queues" \
    --concurrency "$concurrency" \
    --hostname "${MAILROOM_WORKER_NAME:-${queues//,/-}@%h}" \
    --max-tasks-per-child "${MAILROOM_WORKER_MAX_TASKS_PER_CHILD:-1000}" \
    --without-gossip \
    --without-mingle \
    --loglevel "${LOG_LEVEL:-INFO}"
