"""bench/api.py's gunicorn: the product's settings, plus one bench-only URL (floor_urls).

Nothing else differs, so ``/healthz`` and ``POST /api/v1/messages`` are served exactly as in
production; the extra pattern is matched after every product URL.
"""

from messaging_platform.settings import *  # noqa: F403

ROOT_URLCONF = "floor_urls"
