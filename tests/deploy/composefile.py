"""docker-compose.yml as Compose sees it, without Docker: the YAML (anchors and merge keys
resolved by the YAML loader), then variable interpolation by the Compose specification's
rules, against an environment that stands for the shell plus ``.env``.

Supported, as in Compose: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``, defaults that hold
further ``${...}``, and ``$$`` for a literal dollar sign.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"

# Mailroom's own roles (one image), the one-shots among them, and the rest.
LONG_RUNNING_ROLES = ("web", "worker-high", "worker-bulk", "beat", "flower")
ONE_SHOTS = ("migrate", "demo")
APP_SERVICES = (*LONG_RUNNING_ROLES, *ONE_SHOTS)
# Where the image keeps the repository's files (Dockerfile: /app/deploy, /app/services/...).
IMAGE_ROOT = "/app"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    """A required variable is unset, or the text is not valid interpolation syntax."""


@dataclass(frozen=True)
class Reference:
    """One ``${NAME...}`` in the file: the operator (``""`` for none) and its argument."""

    name: str
    operator: str
    argument: str


def _closing_brace(text: str, start: int) -> int:
    """The index of the ``}`` that closes the ``${`` ending just before ``start``."""
    depth = 1
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"unclosed ${{ in {text!r}")


def _split(body: str) -> Reference:
    match = _NAME.match(body)
    if not match:
        raise InterpolationError(f"invalid variable name in ${{{body}}}")
    name, rest = match.group(), body[match.end() :]
    if not rest:
        return Reference(name, "", "")
    for operator in _OPERATORS:
        if rest.startswith(operator):
            return Reference(name, operator, rest[len(operator) :])
    raise InterpolationError(f"invalid interpolation ${{{body}}}")


def _resolve(ref: Reference, env: Mapping[str, str]) -> str:
    value = env.get(ref.name)
    if ref.operator == "":
        return value or ""
    if ref.operator in (":-", "-"):
        unset = value is None or (ref.operator == ":-" and value == "")
        return interpolate_text(ref.argument, env) if unset else str(value)
    if ref.operator in (":?", "?"):
        if value is None or (ref.operator == ":?" and value == ""):
            raise InterpolationError(f"{ref.name} is required: {ref.argument}")
        return value
    present = value is not None and (ref.operator == "+" or value != "")
    return interpolate_text(ref.argument, env) if present else ""


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_resolve(_split(text[i + 2 : end]), env))
            i = end + 1
        elif text[i] == "$" and (match := _NAME.match(text, i + 1)):
            out.append(env.get(match.group(), ""))
            i = match.end()
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def references(text: str) -> list[Reference]:
    """Every variable reference in ``text``, those inside defaults included."""
    found: list[Reference] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            ref = _split(text[i + 2 : end])
            found.append(ref)
            found.extend(references(ref.argument))
            i = end + 1
        elif text[i] == "$" and (match := _NAME.match(text, i + 1)):
            found.append(Reference(match.group(), "", ""))
            i = match.end()
        else:
            i += 1
    return found


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """The value with every string interpolated (Compose interpolates values, not keys)."""
    if isinstance(value, str):
        return interpolate_text(value, env)
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    return value


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    return []


def load_raw(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    return data


def load(env: Mapping[str, str] | None = None, path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The Compose model after interpolation against ``env`` (nothing set by default)."""
    result = interpolate(load_raw(path), env or {})
    assert isinstance(result, dict)
    return result


def parse_dotenv(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=value lines as Compose reads a .env file (comments, blank lines and one level of
    matching quotes handled; no interpolation is used in ours)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=value: {line!r}"
        assert _NAME.fullmatch(key), f"{path.name}:{number}: not a variable name: {key!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a mapping (Compose accepts a list or a mapping)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def command(service: Mapping[str, Any]) -> list[str]:
    raw = service.get("command")
    assert isinstance(raw, list), "commands are written in exec form (a list)"
    return [str(arg) for arg in raw]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


def duration_seconds(text: str) -> float:
    """A Compose duration (``400s``, ``6m40s``, ``1h``) in seconds."""
    parts = _DURATION.findall(text)
    assert "".join(n + u for n, u in parts) == text != "", f"not a duration: {text!r}"
    return sum(float(number) * _UNITS[unit] for number, unit in parts)
