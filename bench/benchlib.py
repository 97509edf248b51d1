"""What every benchmark script needs: its own database, migrated, and Django set up.

Each script keeps a private database between runs (created here when missing) so that
its figures never touch a developer's data or another script's tables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "services" / "mailroom"
PG_URL = "postgres://postgres@127.0.0.1:5432"


def ensure_database(name: str, env: dict[str, str]) -> None:
    """Create database ``name`` if missing (it is kept between runs) and migrate it."""
    import psycopg

    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    argv = [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"]
    done = subprocess.run(argv, cwd=APP_DIR, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{done.stdout}{done.stderr}")


def setup_django(env: dict[str, str]) -> None:
    """Django in this process, with the script's environment."""
    # WhiteNoise: no collectstatic here, the files come from the app finders.
    warnings.filterwarnings("ignore", "No directory at", UserWarning)
    os.environ.update(env)
    sys.path.insert(0, str(APP_DIR))
    import django

    django.setup()
