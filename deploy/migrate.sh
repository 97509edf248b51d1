#!/usr/bin/env bash
# One-shot role: bring the database schema up to date, then, on the first run, create an
# admin user and an API key. Safe to run again and again (every deploy runs it).
#
# Environment:
#   DJANGO_SUPERUSER_USERNAME, DJANGO_SUPERUSER_EMAIL, DJANGO_SUPERUSER_PASSWORD
#       the admin user (for /admin/ and the dashboard). Created by Django's
#       `createsuperuser --no-input` when no user has that name; never changed afterwards.
#       Skipped when the username or the password is empty.
#   MAILROOM_BOOTSTRAP_API_KEY_NAME
#       when no live API key has this name, one with the admin scope is created and printed
#       here, once: only its hash is stored. Empty: skipped (create keys with
#       `manage.py create_api_key` instead, e.g. when logs are shipped somewhere).
#   MAILROOM_PYTHON
#       the Python to run (default: the virtualenv beside deploy/, /app/.venv in the image
#       and .venv in a checkout; else python3)
# Settings come from the environment (messaging_platform/settings.py); `migrate` runs the
# system checks first (messaging_platform/checks.py) and stops, naming a bad variable.
set -o errexit -o pipefail -o nounset

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY_DIR/../services/mailroom"
# The virtualenv beside deploy/: /app/.venv in the image, .venv in a checkout.
python="${MAILROOM_PYTHON:-$DEPLOY_DIR/../.venv/bin/python}"
[[ -n "${MAILROOM_PYTHON:-}" || -x "$python" ]] || python=python3

"$python" manage.py migrate --no-input

# What is still missing: "user", "key", both or neither.
read -r -d '' MISSING <<'PY' || true
import os
from django.contrib.auth import get_user_model
from email_service.models import ApiKey
User = get_user_model()
username = os.environ.get("DJANGO_SUPERUSER_USERNAME", "")
key_name = os.environ.get("MAILROOM_BOOTSTRAP_API_KEY_NAME", "")
missing = []
if username and os.environ.get("DJANGO_SUPERUSER_PASSWORD"):
    if not User.objects.filter(**{User.USERNAME_FIELD: username}).exists():
        missing.append("user")
if key_name and not ApiKey.objects.filter(name=key_name, revoked_at__isnull=True).exists():
    missing.append("key")
print(" ".join(missing))
PY
missing=" $("$python" manage.py shell --no-imports --command "$MISSING") "

if [[ "$missing" == *" user "* ]]; then
    "$python" manage.py createsuperuser --no-input
    echo "migrate.sh: created the admin user '$DJANGO_SUPERUSER_USERNAME'"
fi
if [[ "$missing" == *" key "* ]]; then
    name="$MAILROOM_BOOTSTRAP_API_KEY_NAME"
    key="$("$python" manage.py create_api_key "$name" --scopes admin --quiet)"
    cat <<BANNER
======================================================================================
 API key '$name' (scope: admin). It is shown only now; only its hash is stored.

     $key

 Use it as:  Authorization: Bearer $key
 Revoke it:  python manage.py revoke_api_key $name
======================================================================================
BANNER
fi
echo "migrate.sh: the database is up to date"
