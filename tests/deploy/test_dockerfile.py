"""services/mailroom/Dockerfile and .dockerignore, checked without a Docker engine.

The instructions are read with a small parser (continuation lines joined, comments dropped)
and checked for what an image needs: a pinned slim base, two stages with the dependencies
installed from the lock file alone, a non-root user, a HEALTHCHECK, exec-form commands,
PYTHONUNBUFFERED, static files collected at build and the code copied last. Two steps of
the build are also replayed here: the builder's `uv sync` (from the uv cache, offline) must
give a runtime that imports every module and runs each role's program, and the collectstatic
step must work with nothing but its throwaway SECRET_KEY.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.composefile import IMAGE_ROOT, REPO, load, strings

DOCKERFILE = REPO / "services" / "mailroom" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
MAKEFILE = REPO / "Makefile"
APP = REPO / "services" / "mailroom"


@pytest.fixture(autouse=True)
def _clean_redis() -> None:
    """These tests read files and run commands: no Redis to start or flush."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this instruction belongs to; -1 before the first

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (AssertionError otherwise)."""
        text = (
            re.sub(r"^(--\S+\s+)*(CMD\s+)?", "", self.args)
            if self.keyword == "HEALTHCHECK"
            else self.args
        )
        value = json.loads(text)
        assert isinstance(value, list), self
        assert all(isinstance(v, str) for v in value), self
        return value


def parse(path: Path = DOCKERFILE) -> list[Instruction]:
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    instructions = []
    stage = -1
    for text in logical:
        keyword, _, args = text.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse()


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def _global_args(instructions: list[Instruction]) -> dict[str, str]:
    found = {}
    for i in instructions:
        if i.keyword == "ARG" and i.stage == -1:
            name, _, default = i.args.partition("=")
            found[name] = default
    return found


def _from_images(instructions: list[Instruction]) -> list[tuple[str, str]]:
    """(image, stage name) of every FROM, ARGs resolved."""
    args = _global_args(instructions)
    result = []
    for i in instructions:
        if i.keyword == "FROM":
            parts = i.args.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[str(m[1] or m[2])], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            result.append((image, name))
    return result


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------


def test_the_base_image_is_slim_and_pinned(instructions: list[Instruction]) -> None:
    images = _from_images(instructions)
    stages = {name for _, name in images}
    for image, _ in images:
        if image in stages:
            continue
        repository, _, tag = image.partition("@")[0].partition(":")
        pinned = "@sha256:" in image or re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+", tag)
        assert pinned, f"{image}: pin a patch release (python:3.11.x-slim-bookworm) or a digest"
        assert repository == "python", image
        assert tag.startswith("3.11."), image


def test_it_builds_in_stages_and_the_runtime_takes_only_the_virtualenv(
    instructions: list[Instruction],
) -> None:
    images = _from_images(instructions)
    assert len(images) >= 2, images
    assert images[0][1] == "builder", images
    assert len({image for image, _ in images}) == 1, "one interpreter for both stages"
    runtime = _final_stage(instructions)
    copies_from = [i.args for i in runtime if i.keyword == "COPY" and "--from=" in i.args]
    assert copies_from == ["--from=builder /app/.venv /app/.venv"]
    installs = [
        i.args for i in runtime if i.keyword == "RUN" and re.search(r"\b(pip|uv)\b", i.args)
    ]
    assert not installs, f"nothing is installed into the runtime stage: {installs}"


def test_the_dependencies_come_from_the_lock_file_alone(instructions: list[Instruction]) -> None:
    builder = [i for i in instructions if i.stage == 0]
    syncs = [n for n, i in enumerate(builder) if i.keyword == "RUN" and "uv sync" in i.args]
    assert len(syncs) == 1
    sync = builder[syncs[0]].args
    for flag in ("--frozen", "--no-dev"):
        assert flag in sync.split(), f"uv sync {flag}"
    copies = [i.args for i in builder[: syncs[0]] if i.keyword == "COPY"]
    assert copies == ["services/mailroom/pyproject.toml services/mailroom/uv.lock ./"]
    uv_version = re.search(r"^UV_VERSION := (\S+)$", MAKEFILE.read_text(), re.M)
    assert uv_version
    assert any(i.args == f"UV_VERSION={uv_version[1]}" for i in builder if i.keyword == "ARG")


def test_the_runtime_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    users = [i.args for i in _final_stage(instructions) if i.keyword == "USER"]
    assert users, "the runtime stage sets a USER"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0"), users[-1]
    assert group not in ("root", "0"), users[-1]
    # Numeric, so Kubernetes can enforce runAsNonRoot, and the same the manifests run as.
    assert user.isdigit()
    assert int(user) >= 1000
    manifests = "\n".join(p.read_text() for p in (REPO / "k8s" / "base").glob("*.yaml"))
    assert f"runAsUser: {user}" in manifests


def test_it_has_a_healthcheck_in_exec_form(instructions: list[Instruction]) -> None:
    checks = [i for i in _final_stage(instructions) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    argv = checks[0].exec_form()
    assert argv[:2] == ["python", f"{IMAGE_ROOT}/deploy/healthcheck.py"], argv
    for option in ("--interval", "--timeout", "--start-period", "--retries"):
        assert option in checks[0].args


def test_entrypoint_and_cmd_are_in_exec_form(instructions: list[Instruction]) -> None:
    runtime = _final_stage(instructions)
    entrypoint = [i.exec_form() for i in runtime if i.keyword == "ENTRYPOINT"]
    cmd = [i.exec_form() for i in runtime if i.keyword == "CMD"]
    assert entrypoint == [["/usr/bin/tini", "--"]], "tini forwards SIGTERM and reaps"
    assert cmd == [[f"{IMAGE_ROOT}/deploy/start-web.sh"]]


def test_python_output_is_unbuffered(instructions: list[Instruction]) -> None:
    env = " ".join(i.args for i in _final_stage(instructions) if i.keyword == "ENV")
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert not re.search(r"\bSECRET_KEY=", env), "no secret baked into the image"


def test_the_code_is_copied_last(instructions: list[Instruction]) -> None:
    runtime = _final_stage(instructions)
    copies = [n for n, i in enumerate(runtime) if i.keyword in ("COPY", "ADD")]
    assert runtime[copies[-1]].args == f"services/mailroom {IMAGE_ROOT}/services/mailroom"
    later = {i.keyword for i in runtime[copies[-1] + 1 :]}
    assert later <= {"WORKDIR", "RUN", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
    runs_after = [i.args for i in runtime[copies[-1] + 1 :] if i.keyword == "RUN"]
    assert all("install" not in run for run in runs_after), "dependencies before the code"


def _collectstatic(instructions: list[Instruction]) -> str:
    runs = [i.args for i in _final_stage(instructions) if i.keyword == "RUN"]
    found = [run for run in runs if "manage.py collectstatic" in run]
    assert len(found) == 1, "static files are collected at build time"
    return found[0]


def test_collectstatic_at_build_needs_nothing_but_its_throwaway_secret_key(
    instructions: list[Instruction], tmp_path: Path
) -> None:
    step = _collectstatic(instructions).split("&&")[0]
    words = shlex.split(step)
    assignments = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    argv = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    assert set(assignments) == {"SECRET_KEY"}
    assert argv[:2] == ["python", "manage.py"]
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
        "STATIC_ROOT": str(tmp_path / "static"),
        **assignments,
    }
    proc = subprocess.run(
        argv, cwd=APP, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "static" / "admin").is_dir()


def _image_files(instructions: list[Instruction]) -> set[str]:
    """Paths under /app/deploy that the runtime stage copies in."""
    files = set()
    for i in _final_stage(instructions):
        if i.keyword == "COPY" and "--from=" not in i.args:
            *sources, destination = i.args.split()
            if destination == f"{IMAGE_ROOT}/deploy/":
                files |= {f"{IMAGE_ROOT}/{source}" for source in sources}
    return files


def test_every_script_the_deployments_run_is_in_the_image(
    instructions: list[Instruction],
) -> None:
    texts = strings(load())
    texts += [p.read_text() for p in (REPO / "k8s").rglob("*.yaml")]
    used = {m for text in texts for m in re.findall(rf"{IMAGE_ROOT}/deploy/[\w.-]+", text)}
    used |= {
        arg
        for i in _final_stage(instructions)
        for arg in re.findall(rf"{IMAGE_ROOT}/deploy/[\w.-]+", i.args)
    }
    assert {"/app/deploy/start-web.sh", "/app/deploy/healthcheck.py"} <= used
    copied = _image_files(instructions)
    assert used <= copied, f"run but not in the image: {sorted(used - copied)}"
    for path in copied:
        local = REPO / path[len(IMAGE_ROOT) + 1 :]
        assert local.is_file(), path
        if local.suffix == ".sh":
            assert local.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "deploy").glob("start-*.sh")))
def test_start_scripts_are_strict_and_end_in_exec(script: str) -> None:
    path = REPO / "deploy" / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -o errexit -o pipefail -o nounset" in text
    subprocess.run(["bash", "-n", str(path)], check=True)
    commands = re.sub(r"\\\n\s*", " ", text).strip().splitlines()
    assert commands[-1].startswith("exec "), f"{script} must end in exec: {commands[-1]}"
    assert path.stat().st_mode & stat.S_IXUSR


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excluded?, regex) per line; Docker's syntax: * ? ** and a leading ! for exceptions."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/?|\*|\?)", pattern):
            if token in ("**", "**/"):
                regex += "(.*/)?" if token == "**/" else ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            else:
                regex += re.escape(token)
        rules.append((exclude, re.compile(regex + "$")))
    return rules


def _in_context(path: str) -> bool:
    """Whether Docker sends ``path`` to the builder: the last rule matching the path or one
    of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for exclude, regex in _dockerignore_rules():
        if any(regex.match(candidate) for candidate in candidates):
            included = not exclude
    return included


def test_dockerignore_lets_in_only_what_the_image_copies(
    instructions: list[Instruction],
) -> None:
    for path in _image_files(instructions):
        assert _in_context(path[len(IMAGE_ROOT) + 1 :]), path
    for path in (
        "services/mailroom/manage.py",
        "services/mailroom/uv.lock",
        "services/mailroom/email_service/templates/emails/welcome.html",
    ):
        assert _in_context(path), path
    for path in (
        ".env",
        ".git/config",
        ".venv/bin/python",
        ".tools/bin/uv",
        "tests/conftest.py",
        "test-output/web.log",
        ".dev/celerybeat-schedule",
        "dev/run.py",
        "services/mailroom/staticfiles/admin/css/base.css",
        "services/mailroom/email_service/__pycache__/models.cpython-311.pyc",
    ):
        assert not _in_context(path), f"{path} must stay out of the build context"


# --------------------------------------------------------------------------------------
# The builder's dependency step, replayed
# --------------------------------------------------------------------------------------


def _uv() -> str:
    found = shutil.which("uv") or str(REPO / ".tools" / "bin" / "uv")
    if not Path(found).exists():
        pytest.fail("uv is required: `make setup` installs it", pytrace=False)
    return found


@pytest.mark.timeout(300)
def test_the_locked_runtime_dependencies_run_every_role(tmp_path: Path) -> None:
    """`uv sync --frozen --no-dev` from pyproject.toml and uv.lock alone, as the builder
    does it: the result must import every module of the app and run each role's program.
    A runtime import of a dev-only package would break the image, not the test suite."""
    project = tmp_path / "services" / "mailroom"
    project.mkdir(parents=True)
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(APP / name, project / name)
    venv = tmp_path / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_PYTHON_DOWNLOADS": "never"}
    sync = [_uv(), "sync", "--frozen", "--no-dev", "--no-install-project", "--offline"]
    sync += ["--python", sys.executable]
    proc = subprocess.run(
        sync, cwd=project, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"(the uv cache is filled by `make setup`)\n{proc.stderr}"

    python = str(venv / "bin" / "python")
    run_env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin", "SECRET_KEY": "check"}
    imports = (
        "import importlib, pkgutil, django; django.setup(); import email_service; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages("
        "email_service.__path__, 'email_service.') if '.migrations' not in m.name]; "
        "import gunicorn, celery, flower; print('ok')"
    )
    checks = [
        [python, "-c", imports],
        [str(venv / "bin" / "gunicorn"), "--version"],
        [str(venv / "bin" / "celery"), "--app", "messaging_platform", "flower", "--help"],
    ]
    for argv in checks:
        result = subprocess.run(
            argv,
            cwd=APP,
            env={**run_env, "DJANGO_SETTINGS_MODULE": "messaging_platform.settings"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"{argv}:\n{result.stdout}{result.stderr}"
