"""docker-compose.yml, checked without a Docker engine.

Compose's own schema (the compose-spec JSON schema that check-jsonschema vendors) must accept
the file as written and as interpolated, both with no .env at all (what `docker compose up`
sees on a fresh checkout) and with .env.example's values. Then the rules that make the stack
work: health checks, conditions on depends_on, one image for every Mailroom role, no
container_name (so --scale works), grace periods above the task time limit, and the wiring
between services (Prometheus targets, Grafana provisioning, Mailpit as the SMTP relay).
That the commands themselves work is shown by test_compose_roles.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.composefile import (
    APP_SERVICES,
    COMPOSE_FILE,
    ENV_EXAMPLE,
    IMAGE_ROOT,
    LONG_RUNNING_ROLES,
    ONE_SHOTS,
    REPO,
    command,
    duration_seconds,
    environment,
    interpolate_text,
    load,
    load_raw,
    parse_dotenv,
    references,
    strings,
)

WORKERS = ("worker-high", "worker-bulk")
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "grafana"
CELERY_EXPORTER_SCRIPT = REPO / "dev" / "celery_exporter.sh"


@pytest.fixture(autouse=True)
def _clean_redis() -> None:
    """These tests read files: no Redis to start or flush (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The model `docker compose up` works from on a fresh checkout: no .env, nothing set."""
    return load()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _long_running(services: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name in services if name not in ONE_SHOTS]


# --------------------------------------------------------------------------------------
# Compose's parser
# --------------------------------------------------------------------------------------


def test_compose_spec_schema_accepts_the_file_raw_and_interpolated(tmp_path: Path) -> None:
    documents = [COMPOSE_FILE]
    for name, env in {"no-env": {}, "env-example": parse_dotenv()}.items():
        path = tmp_path / f"compose-{name}.json"
        path.write_text(json.dumps(load(env)))
        documents.append(path)
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            *map(str, documents),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_up_needs_no_env_file_every_variable_has_a_default() -> None:
    refs = [ref for text in strings(load_raw()) for ref in references(text)]
    assert refs, "the file is configurable through variables"
    required = sorted({ref.name for ref in refs if ref.operator in ("", "?", ":?")})
    assert not required, f"variables without a default (a .env would be required): {required}"


def test_env_example_lists_every_variable_with_the_default_of_the_compose_file() -> None:
    example = parse_dotenv()
    refs = {ref.name: ref for text in strings(load_raw()) for ref in references(text)}
    assert sorted(example) == sorted(refs), "the same variables in .env.example and compose"
    for name, ref in refs.items():
        default = interpolate_text(ref.argument, {})
        assert example[name] == default, f"{name}: .env.example says {example[name]!r}"


def test_env_example_secrets_are_obviously_fake() -> None:
    example = parse_dotenv()
    secret = re.compile(r"SECRET|PASSWORD|TOKEN|AUTH")
    names = [name for name in example if secret.search(name) and example[name]]
    assert len(names) >= 6, names
    for name in names:
        assert re.search(r"change-me|local", example[name]), f"{name} does not look fake"


# --------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------


def test_the_services_of_the_issue_are_all_there(services: dict[str, Any]) -> None:
    expected = {
        *APP_SERVICES,
        "celery-exporter",
        "redis",
        "postgres",
        "mailpit",
        "prometheus",
        "grafana",
    }
    assert set(services) == expected


def test_every_long_running_service_has_a_health_check(services: dict[str, Any]) -> None:
    for name in _long_running(services):
        check = services[name].get("healthcheck") or {}
        assert not check.get("disable"), name
        test = check.get("test")
        assert isinstance(test, list), name
        assert test[0] in ("CMD", "CMD-SHELL"), name
        assert test[1:], name
        for key in ("interval", "timeout", "start_period"):
            duration_seconds(check[key])


def test_no_service_sets_container_name(services: dict[str, Any]) -> None:
    assert [name for name, svc in services.items() if "container_name" in svc] == []


def test_every_mailroom_role_runs_the_one_image(services: dict[str, Any]) -> None:
    images = {name: (services[name]["image"], services[name]["build"]) for name in APP_SERVICES}
    assert len({json.dumps(value, sort_keys=True) for value in images.values()}) == 1, images
    _, build = images["web"]
    assert build == {"context": ".", "dockerfile": "services/mailroom/Dockerfile"}
    assert (REPO / build["dockerfile"]).is_file()
    others = {name for name, svc in services.items() if "build" in svc} - set(APP_SERVICES)
    assert not others, f"only Mailroom's roles are built here: {others}"


def test_each_role_is_picked_by_its_start_script(services: dict[str, Any]) -> None:
    expected = {
        "web": "start-web.sh",
        "worker-high": "start-worker.sh",
        "worker-bulk": "start-worker.sh",
        "beat": "start-beat.sh",
        "flower": "start-flower.sh",
        "migrate": "migrate.sh",
    }
    for name, script in expected.items():
        assert command(services[name]) == [f"{IMAGE_ROOT}/deploy/{script}"], name
        assert (REPO / "deploy" / script).is_file()
    assert command(services["demo"])[:3] == ["python", "manage.py", "demo"]


def test_depends_on_waits_for_health_or_completion(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions, not a list"
        for target, spec in depends.items():
            condition = spec.get("condition")
            if target in ONE_SHOTS:
                assert condition == "service_completed_successfully", (name, target)
            else:
                assert condition == "service_healthy", (name, target)
                assert "healthcheck" in services[target], (name, target)


def test_mailroom_roles_start_after_the_schema_and_their_stores(services: dict[str, Any]) -> None:
    for name in ("web", "worker-high", "worker-bulk", "beat", "demo"):
        assert {"migrate", "redis", "postgres"} <= set(services[name]["depends_on"]), name
    assert {"redis", "postgres"} <= set(services["migrate"]["depends_on"])
    demo = services["demo"]
    assert demo.get("profiles") == ["demo"], "the demo runs only when asked for"
    assert {"web", *WORKERS, "beat"} <= set(demo["depends_on"])


def test_worker_grace_periods_exceed_the_task_time_limit(services: dict[str, Any]) -> None:
    for name in WORKERS:
        env = environment(services[name])
        soft = float(env["CELERY_TASK_SOFT_TIME_LIMIT"])
        hard = float(env["CELERY_TASK_TIME_LIMIT"])
        grace = duration_seconds(services[name]["stop_grace_period"])
        assert soft < hard < grace, (name, soft, hard, grace)
    # web: above gunicorn's --graceful-timeout in its start script.
    graceful = re.search(r"--graceful-timeout (\d+)", (REPO / "deploy/start-web.sh").read_text())
    assert graceful
    assert duration_seconds(services["web"]["stop_grace_period"]) > int(graceful[1])


def test_each_worker_pool_takes_its_queue_and_concurrency_from_the_environment() -> None:
    raw = load_raw()["services"]
    queues = {"worker-high": "high_priority", "worker-bulk": "bulk"}
    variables = {}
    for name, queue in queues.items():
        env = raw[name]["environment"]
        assert env["MAILROOM_WORKER_QUEUE"] == queue
        refs = references(str(env["MAILROOM_WORKER_CONCURRENCY"]))
        assert [ref.operator for ref in refs] == [":-"], name
        variables[name] = refs[0].name
        assert int(refs[0].argument) >= 1
    assert len(set(variables.values())) == 2, "one variable per pool"
    custom = load({variables["worker-bulk"]: "12"})["services"]["worker-bulk"]
    assert environment(custom)["MAILROOM_WORKER_CONCURRENCY"] == "12"


def test_workers_can_be_scaled_with_scale(services: dict[str, Any]) -> None:
    for name in WORKERS:
        assert "ports" not in services[name], f"{name}: a published port stops --scale"
        assert "container_name" not in services[name]


def test_published_ports_listen_on_localhost_only(services: dict[str, Any]) -> None:
    published = {name: port for name, svc in services.items() for port in svc.get("ports", [])}
    assert {"web", "flower", "mailpit", "prometheus", "grafana"} <= set(published)
    for name, port in published.items():
        assert str(port).startswith("127.0.0.1:"), (name, port)
    for name in ("redis", "postgres", "celery-exporter"):
        assert "ports" not in services[name], f"{name} stays on the internal network"


def test_redis_keeps_an_append_only_file_never_evicts_and_uses_a_volume(
    services: dict[str, Any], compose: dict[str, Any]
) -> None:
    redis = services["redis"]
    args = command(redis)
    assert args[0] == "redis-server"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert _named_volume(redis, "/data") in compose["volumes"]
    postgres = services["postgres"]
    assert _named_volume(postgres, "/var/lib/postgresql/data") in compose["volumes"]


def _named_volume(service: dict[str, Any], target: str) -> str:
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == target:
            return source
    raise AssertionError(f"nothing is mounted at {target}")


def test_the_database_url_matches_the_postgres_service(services: dict[str, Any]) -> None:
    pg = environment(services["postgres"])
    for name in APP_SERVICES:
        url = environment(services[name])["DATABASE_URL"]
        expected = (
            f"postgres://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
            f"@postgres:5432/{pg['POSTGRES_DB']}"
        )
        assert url == expected, name
        assert environment(services[name])["REDIS_URL"].startswith("redis://redis:6379/")


def test_mailpit_is_the_default_smtp_relay(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        env = environment(services[name])
        assert (env["EMAIL_HOST"], env["EMAIL_PORT"]) == ("mailpit", "1025"), name
    assert services["mailpit"]["image"].startswith("axllent/mailpit:")
    assert any(str(p).endswith(":8025") for p in services["mailpit"]["ports"])
    relay = load({"EMAIL_HOST": "smtp.example.net", "EMAIL_PORT": "587"})["services"]
    assert environment(relay["worker-bulk"])["EMAIL_HOST"] == "smtp.example.net"


def test_third_party_images_are_pinned(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        if name in APP_SERVICES:
            continue
        image = svc["image"]
        _, _, tag = image.rpartition(":")
        # A release, not a moving tag: 1.2.3, v1.2.3, or PostgreSQL's major.minor (17.6).
        assert re.match(r"v?\d+\.\d+(\.\d+)?(-[a-z]+)?$", tag), f"{name}: {image} is not pinned"


def test_celery_exporter_is_the_release_make_dev_runs(services: dict[str, Any]) -> None:
    pinned = re.search(r"prometheus-exporter-celery==([\d.]+)", CELERY_EXPORTER_SCRIPT.read_text())
    assert pinned
    image = services["celery-exporter"]["image"]
    assert image == f"danihodovic/celery-exporter:{pinned[1]}"
    args = command(services["celery-exporter"])
    assert "--broker-url=redis://redis:6379/0" in args
    assert "--queues=high_priority,bulk" in args


def test_prometheus_scrapes_the_compose_services_with_the_web_roles_token(
    services: dict[str, Any], compose: dict[str, Any]
) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    listening = {"web": 8000, "flower": 5555, "celery-exporter": 9808, "localhost": 9090}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.partition(":")
                assert host == "localhost" or host in services, target
                assert listening[host] == int(port), target
    prometheus = services["prometheus"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in command(prometheus)

    # One token, two readers: the web role's settings file and Prometheus' credentials file.
    [web_job] = [job for job in config["scrape_configs"] if job["job_name"] == "mailroom-web"]
    credentials = web_job["authorization"]["credentials_file"]
    prom_config = {c["target"]: c["source"] for c in prometheus["configs"]}
    web_config = {c["target"]: c["source"] for c in services["web"]["configs"]}
    token_file = environment(services["web"])["MAILROOM_METRICS_TOKEN_FILE"]
    assert prom_config[credentials] == web_config[token_file]
    assert compose["configs"][web_config[token_file]]["content"]


def test_grafana_is_provisioned_from_the_repository(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/mailroom.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_path] == "./grafana/dashboards"
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert url == "http://prometheus:9090"
    assert "prometheus" in grafana["depends_on"]
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_path + "/")
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()


def test_migrate_creates_the_first_admin_and_api_key_from_the_environment(
    services: dict[str, Any],
) -> None:
    env = environment(services["migrate"])
    for name in ("USERNAME", "EMAIL", "PASSWORD"):
        assert env[f"DJANGO_SUPERUSER_{name}"], name
    assert env["MAILROOM_BOOTSTRAP_API_KEY_NAME"]
    assert services["migrate"]["restart"] == "no"
    # Nobody else holds the admin's password.
    others = [name for name in APP_SERVICES if name != "migrate"]
    assert not [n for n in others if "DJANGO_SUPERUSER_PASSWORD" in environment(services[n])]


def test_env_example_is_not_committed_as_env() -> None:
    assert ENV_EXAMPLE.is_file()
    tracked = subprocess.run(
        ["git", "ls-files", ".env"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert tracked.stdout.strip() == "", "a real .env must never be committed"


def test_the_long_running_roles_are_the_ones_the_role_test_starts(
    services: dict[str, Any],
) -> None:
    """test_compose_roles.py starts LONG_RUNNING_ROLES; a new role must be added there."""
    built = [name for name in services if "build" in services[name] and name not in ONE_SHOTS]
    assert sorted(built) == sorted(LONG_RUNNING_ROLES)
