"""The import layers of ``.importlinter`` hold, and break when a lower module imports a
higher one (``make lint`` runs the same check on the real tree)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "services" / "mailroom"
CONFIG = REPO / ".importlinter"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(CONFIG)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def app_copy(tmp_path: Path) -> Path:
    shutil.copytree(
        APP / "email_service",
        tmp_path / "email_service",
        ignore=shutil.ignore_patterns("__pycache__", "templates", "static"),
    )
    return tmp_path


def test_the_tree_keeps_its_layers(app_copy: Path) -> None:
    run = _lint(app_copy)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("keys.py", "from email_service import services"),
        ("outbox.py", "from email_service.services import accepting"),
        ("services/dispatch.py", "from email_service.services import campaigns"),
    ],
)
def test_a_lower_module_importing_a_higher_one_breaks_the_contract(
    app_copy: Path, module: str, upward: str
) -> None:
    path = app_copy / "email_service" / module
    path.write_text(path.read_text() + f"\n{upward}  # noqa: E402\n")

    run = _lint(app_copy)

    assert run.returncode != 0
    assert "BROKEN" in run.stdout, run.stdout
    assert module.removesuffix(".py").replace("/", ".") in run.stdout
