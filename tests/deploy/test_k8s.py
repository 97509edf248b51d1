"""k8s/: both overlays build with `kubectl kustomize`, every rendered object validates
against the Kubernetes schemas in strict mode (kubernetes-validate, offline), the KEDA
ScaledObjects against a schema of their CRD (tests/deploy/schemas/, written from KEDA's
documented specification), and the manifests keep the promises an operator relies on:
probes, grace periods, one beat, a transactional pool that never scales to zero.

kubectl is Debian's kubernetes-client (1.20, kustomize v2.0.3) or a newer one (v5): the
kustomizations are written so that both render them. Without kubectl these tests fail
rather than skip; .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from django.conf import settings

from tests.deploy.composefile import REPO

K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32.0"
SCALED_OBJECT_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.json"
SECRET_TEMPLATE = K8S / "base" / "secret.template.yaml"
ROLES = ("web", "worker-high", "worker-bulk", "beat", "flower", "celery-exporter")
WORKERS = {"worker-high": "high_priority", "worker-bulk": "bulk"}
MAILROOM_ROLES = ("web", "worker-high", "worker-bulk", "beat", "flower")

Obj = dict[str, Any]


@pytest.fixture(autouse=True)
def _clean_redis() -> None:
    """These tests render files: no Redis to start or flush (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is required: apt-get install kubernetes-client (.ci/run installs it)",
            pytrace=False,
        )
    return path


def render(kubectl: str, overlay: str) -> list[Obj]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize overlays/{overlay}:\n{proc.stderr}"
    # Newer kustomize warns about `bases` and `patchesStrategicMerge` (kept for kubectl
    # 1.20); anything else on stderr is a problem.
    noise = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and not re.match(r"# Warning: '(bases|patchesStrategicMerge)'", line)
    ]
    assert not noise, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[Obj]]:
    return {overlay: render(kubectl, overlay) for overlay in OVERLAYS}


def _objects(rendered: dict[str, list[Obj]]) -> Iterator[tuple[str, Obj]]:
    for overlay, objects in rendered.items():
        for obj in objects:
            yield overlay, obj


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def main_container(obj: Obj) -> Obj:
    container: Obj = pod_spec(obj)["containers"][0]
    return container


def config_map(objects: list[Obj]) -> dict[str, str]:
    [cm] = [o for o in objects if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"].startswith("mailroom-config")
    data: dict[str, str] = cm["data"]
    return data


def _values_of(value: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` anywhere in a nested structure."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == key:
                yield v
            yield from _values_of(v, key)
    elif isinstance(value, list):
        for item in value:
            yield from _values_of(item, key)


def env_of(obj: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in main_container(obj).get("env", [])}


# --------------------------------------------------------------------------------------
# Rendering and schemas
# --------------------------------------------------------------------------------------


def test_both_overlays_build(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objects in rendered.items():
        kinds = {o["kind"] for o in objects}
        expected = {"Deployment", "Service", "ConfigMap", "Job", "ScaledObject"}
        expected |= {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Namespace"}
        assert expected <= kinds, (overlay, kinds)
        namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
        [namespace] = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
        assert namespaces == {namespace}, (overlay, namespaces)


def test_every_object_validates_against_the_kubernetes_schemas_in_strict_mode(
    rendered: dict[str, list[Obj]],
) -> None:
    checked = 0
    for overlay, obj in _objects(rendered):
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: see the ScaledObject test
        kind_name = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind_name}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked > 20


def test_the_secret_template_validates_and_names_every_key_the_roles_read(
    rendered: dict[str, list[Obj]],
) -> None:
    template = yaml.safe_load(SECRET_TEMPLATE.read_text())
    kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
    keys = set(template["stringData"])
    for key, value in template["stringData"].items():
        if re.search(r"SECRET|PASSWORD|TOKEN|AUTH|_URL", key):
            assert "REPLACE" in value, f"{key}: the template holds placeholders only"
    for overlay, obj in _objects(rendered):
        for ref in _values_of(obj, "secretKeyRef"):
            if ref["name"] == "mailroom-secrets" and ref["key"] != "POSTGRES_PASSWORD":
                assert ref["key"] in keys, (overlay, ref)
    dev_secret = find(rendered["dev"], "Secret", "mailroom-secrets")
    assert keys <= set(dev_secret["stringData"]), "dev has every key of the template"
    assert not [o for o in rendered["prod"] if o["kind"] == "Secret"], "prod ships no secret"


def test_strict_validation_rejects_an_unknown_field(rendered: dict[str, list[Obj]]) -> None:
    """The validator is not a rubber stamp: a typo in a probe is an error."""
    web = json.loads(json.dumps(find(rendered["prod"], "Deployment", "web")))
    main_container(web)["livenessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(web, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def scaled_object_schema() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCALED_OBJECT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_scaled_objects_validate_against_the_keda_crd_schema(
    rendered: dict[str, list[Obj]], scaled_object_schema: jsonschema.Draft202012Validator
) -> None:
    for overlay, objects in rendered.items():
        scaled = [o for o in objects if o["apiVersion"].startswith("keda.sh/")]
        assert {o["kind"] for o in scaled} == {"ScaledObject"}
        assert sorted(o["metadata"]["name"] for o in scaled) == sorted(WORKERS)
        for obj in scaled:
            errors = [e.message for e in scaled_object_schema.iter_errors(obj)]
            assert not errors, (overlay, obj["metadata"]["name"], errors)
            spec = obj["spec"]
            assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
            if "idleReplicaCount" in spec:
                assert spec["idleReplicaCount"] < spec.get("minReplicaCount", 0)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda s: s.update(minReplicas=1), "an HPA field, not KEDA's"),
        (lambda s: s.update(minReplicaCount="1"), "a string count"),
        (lambda s: s["scaleTargetRef"].pop("name"), "no target"),
        (lambda s: s.update(triggers=[]), "no trigger"),
        (lambda s: s["triggers"][0]["metadata"].update(listLength=8), "a number in metadata"),
        (lambda s: s["triggers"][0]["metadata"].pop("listName"), "redis without a list"),
        (lambda s: s["triggers"][0]["metadata"].update(listname="bulk"), "a misspelt parameter"),
        (lambda s: s["triggers"][0].update(authRef={"name": "x"}), "an unknown trigger field"),
        (lambda s: s.update(fallback={"replicas": 2}), "a fallback without a threshold"),
    ],
)
def test_the_scaled_object_schema_rejects_what_keda_would(
    rendered: dict[str, list[Obj]],
    scaled_object_schema: jsonschema.Draft202012Validator,
    change: Any,
    why: str,
) -> None:
    obj = json.loads(json.dumps(find(rendered["dev"], "ScaledObject", "worker-bulk")))
    change(obj["spec"])
    assert list(scaled_object_schema.iter_errors(obj)), why


# --------------------------------------------------------------------------------------
# What the manifests promise
# --------------------------------------------------------------------------------------


def test_there_is_a_deployment_per_role_on_the_one_image(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objects in rendered.items():
        images = set()
        for role in ROLES:
            deployment = find(objects, "Deployment", role)
            image = main_container(deployment)["image"]
            if role in MAILROOM_ROLES:
                images.add(image)
                assert main_container(deployment)["args"] == [_start_script(role)]
                assert "command" not in main_container(deployment), "tini stays the entrypoint"
        [image] = images
        assert re.search(r":\d+\.\d+\.\d+$|:local$", image), (overlay, image)
        job = find(objects, "Job", "migrate")
        assert main_container(job)["image"] == image
        assert main_container(job)["args"] == ["/app/deploy/migrate.sh"]


def _start_script(role: str) -> str:
    script = "start-worker.sh" if role.startswith("worker-") else f"start-{role}.sh"
    return f"/app/deploy/{script}"


def test_beat_runs_exactly_one_replica_recreated_never_rolled(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        beat = find(objects, "Deployment", "beat")
        assert beat["spec"]["replicas"] == 1
        assert beat["spec"]["strategy"] == {"type": "Recreate"}
        targets = {
            o["spec"]["scaleTargetRef"]["name"]
            for o in objects
            if "scaleTargetRef" in o.get("spec", {})
        }
        assert "beat" not in targets, "nothing autoscales beat"


def test_high_priority_never_scales_to_zero_and_bulk_does(rendered: dict[str, list[Obj]]) -> None:
    for overlay, objects in rendered.items():
        high = find(objects, "ScaledObject", "worker-high")["spec"]
        bulk = find(objects, "ScaledObject", "worker-bulk")["spec"]
        assert high["minReplicaCount"] >= 1, overlay
        assert "idleReplicaCount" not in high, overlay
        assert bulk.get("minReplicaCount", 0) == 0, overlay
        assert bulk["maxReplicaCount"] >= 20, "twenty bulk workers during a campaign"


def test_each_scaled_object_watches_its_pools_queue_in_the_workers_redis(
    rendered: dict[str, list[Obj]],
) -> None:
    for overlay, objects in rendered.items():
        for name, queue in WORKERS.items():
            scaled = find(objects, "ScaledObject", name)["spec"]
            assert scaled["scaleTargetRef"] == {"name": name}
            deployment = find(objects, "Deployment", name)
            assert env_of(deployment)["MAILROOM_WORKER_QUEUE"] == queue
            [trigger] = scaled["triggers"]
            assert trigger["type"] == "redis"
            assert trigger["metadata"]["listName"] == queue
            # The *FromEnv variables come from the target container's envFrom.
            env_from = [
                s.get("secretRef", {}).get("name") for s in main_container(deployment)["envFrom"]
            ]
            assert "mailroom-secrets" in env_from
            metadata = trigger["metadata"]
            for variable in (metadata["addressFromEnv"], metadata["passwordFromEnv"]):
                template = yaml.safe_load(SECRET_TEMPLATE.read_text())["stringData"]
                assert variable in template, variable
        if overlay == "dev":
            secret = find(objects, "Secret", "mailroom-secrets")["stringData"]
            [namespace] = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
            host = secret["REDIS_ADDRESS"].rpartition(":")[0]
            assert host == f"redis.{namespace}.svc.cluster.local", "KEDA lives elsewhere"
            assert secret["REDIS_URL"].startswith("redis://redis:6379/0")
            assert metadata["databaseIndex"] == "0"


def test_autoscaled_deployments_leave_the_replica_count_to_their_autoscaler(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        for name in ("web", *WORKERS):
            assert "replicas" not in find(objects, "Deployment", name)["spec"], name
        hpa = find(objects, "HorizontalPodAutoscaler", "web")["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "web",
        }
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert find(rendered["prod"], "HorizontalPodAutoscaler", "web")["spec"]["minReplicas"] >= 2


def test_web_probes_healthz_for_liveness_and_readyz_for_readiness(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        web = main_container(find(objects, "Deployment", "web"))
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            get = web[probe]["httpGet"]
            assert (get["path"], get["port"]) == (path, "http"), probe
            # Django's ALLOWED_HOSTS sees this Host, not the pod's IP.
            assert {"name": "Host", "value": "localhost"} in get["httpHeaders"]
        allowed = config_map(objects)["ALLOWED_HOSTS"].split(",")
        assert "localhost" in allowed
        assert "web" in allowed


QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi)?")


def _bytes(quantity: str) -> int:
    match = QUANTITY.fullmatch(quantity)
    assert match, quantity
    number, unit = match.groups()
    return int(number) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


def test_a_web_pod_busy_with_its_longest_requests_is_neither_killed_nor_evicted(
    rendered: dict[str, list[Obj]],
) -> None:
    """Every gunicorn worker may be inside a recipient upload for up to the web timeout,
    each with its upload spooled to /tmp: liveness must outlast that, /tmp must hold it."""
    for objects in rendered.values():
        config = config_map(objects)
        deployment = find(objects, "Deployment", "web")
        web = main_container(deployment)
        timeout = int(config.get("MAILROOM_WEB_TIMEOUT", settings.MAILROOM_WEB_TIMEOUT))
        live = web["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > timeout
        workers = int(env_of(deployment)["WEB_CONCURRENCY"])
        upload = int(
            config.get("MAILROOM_API_MAX_UPLOAD_BYTES", settings.MAILROOM_API_MAX_UPLOAD_BYTES)
        )
        [tmp] = [v for v in pod_spec(deployment)["volumes"] if v["name"] == "tmp"]
        assert _bytes(tmp["emptyDir"]["sizeLimit"]) >= workers * upload
        mounts = {m["mountPath"]: m["name"] for m in web["volumeMounts"]}
        assert mounts["/tmp"] == "tmp"


def test_workers_and_beat_probe_their_files_not_celery_inspect(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        for name, role in (("worker-high", "worker"), ("worker-bulk", "worker"), ("beat", "beat")):
            container = main_container(find(objects, "Deployment", name))
            for probe in ("startupProbe", "livenessProbe"):
                argv = container[probe]["exec"]["command"]
                assert argv == ["python", "/app/deploy/healthcheck.py", role], (name, probe)
            assert "inspect" not in json.dumps(container)
        flower = main_container(find(objects, "Deployment", "flower"))
        assert flower["livenessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_grace_periods_exceed_the_task_time_limit(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        config = config_map(objects)
        soft = int(config["CELERY_TASK_SOFT_TIME_LIMIT"])
        hard = int(config["CELERY_TASK_TIME_LIMIT"])
        for name in WORKERS:
            grace = pod_spec(find(objects, "Deployment", name))["terminationGracePeriodSeconds"]
            assert soft < hard < grace, (name, soft, hard, grace)
        web = pod_spec(find(objects, "Deployment", "web"))
        graceful = re.search(
            r"--graceful-timeout (\d+)", (REPO / "deploy/start-web.sh").read_text()
        )
        assert graceful
        assert web["terminationGracePeriodSeconds"] > int(graceful[1])


def test_worker_concurrency_is_explicit_and_fits_the_cpu_limit(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        for name in WORKERS:
            container = main_container(find(objects, "Deployment", name))
            concurrency = int(
                env_of(find(objects, "Deployment", name))["MAILROOM_WORKER_CONCURRENCY"]
            )
            assert 1 <= concurrency <= 8
            assert container["resources"]["limits"]["memory"]


def test_every_container_has_requests_and_limits(rendered: dict[str, list[Obj]]) -> None:
    for overlay, obj in _objects(rendered):
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = pod_spec(obj)
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), (
                    overlay,
                    obj["metadata"]["name"],
                    container["name"],
                    part,
                )


def test_mailroom_pods_run_as_non_root_with_a_read_only_root(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] not in ("Deployment", "Job") or obj["metadata"]["name"] == "mailpit":
                continue
            spec = pod_spec(obj)
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["automountServiceAccountToken"] is False
            for container in spec.get("initContainers", []) + spec["containers"]:
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True
                assert security["allowPrivilegeEscalation"] is False
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, "the only place the roles write"


def test_every_role_that_uses_the_database_waits_for_migrations(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        for name in ("web", *WORKERS, "beat"):
            [init] = pod_spec(find(objects, "Deployment", name))["initContainers"]
            assert init["args"] == ["/app/deploy/wait-for-migrations.sh"]
        job = find(objects, "Job", "migrate")["spec"]
        assert job["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
        assert job["backoffLimit"] >= 1
        assert job["ttlSecondsAfterFinished"] > 0


def test_settings_and_secrets_reach_every_mailroom_role_through_env_from(
    rendered: dict[str, list[Obj]],
) -> None:
    for objects in rendered.values():
        config_name = next(o for o in objects if o["kind"] == "ConfigMap")["metadata"]["name"]
        for obj in objects:
            if obj["kind"] not in ("Deployment", "Job") or obj["metadata"]["name"] not in (
                *MAILROOM_ROLES,
                "migrate",
            ):
                continue
            refs = main_container(obj)["envFrom"]
            assert {"configMapRef": {"name": config_name}} in refs
            assert {"secretRef": {"name": "mailroom-secrets"}} in refs


def test_pod_disruption_budgets_cover_web_and_worker_high(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        budgets = {
            o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"
        }
        assert set(budgets) == {"web", "worker-high"}
        for name, spec in budgets.items():
            labels = find(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items()
        web_min = find(objects, "HorizontalPodAutoscaler", "web")["spec"]["minReplicas"]
        assert budgets["web"].get("minAvailable", 0) < max(web_min, 2)
    prod_high = find(rendered["prod"], "ScaledObject", "worker-high")["spec"]["minReplicaCount"]
    assert prod_high >= 2, "a drain of one node never leaves the transactional pool empty"


def test_services_select_their_pods(rendered: dict[str, list[Obj]]) -> None:
    for objects in rendered.values():
        workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
        for service in (o for o in objects if o["kind"] == "Service"):
            selector = service["spec"]["selector"]
            matched = [
                w
                for w in workloads
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(matched) == 1, service["metadata"]["name"]
            ports = {
                p["name"] for c in pod_spec(matched[0])["containers"] for p in c.get("ports", [])
            }
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, (service["metadata"]["name"], port)


def test_dev_runs_redis_postgres_and_mailpit_in_the_cluster(rendered: dict[str, list[Obj]]) -> None:
    dev = rendered["dev"]
    redis = main_container(find(dev, "StatefulSet", "redis"))
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    find(dev, "StatefulSet", "postgres")
    find(dev, "Deployment", "mailpit")
    secret = find(dev, "Secret", "mailroom-secrets")["stringData"]
    assert (secret["EMAIL_HOST"], secret["EMAIL_PORT"]) == ("mailpit", "1025")
    assert "@postgres:5432/" in secret["DATABASE_URL"]
    assert config_map(dev)["MAILROOM_BOOTSTRAP_API_KEY_NAME"]


def test_prod_uses_external_services_named_in_the_secret(rendered: dict[str, list[Obj]]) -> None:
    prod = rendered["prod"]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in prod}
    for name in ("redis", "postgres", "mailpit"):
        assert not {k for k in kinds if k[1] == name}, f"prod runs no {name} of its own"
    for name, obj in ((o["metadata"]["name"], o) for o in prod):
        if obj["kind"] == "ScaledObject":
            assert obj["spec"]["triggers"][0]["metadata"]["enableTLS"] == "true", name
    config = config_map(prod)
    assert config["MAILROOM_BOOTSTRAP_API_KEY_NAME"] == "", "no API key in production logs"
    assert config["MAILROOM_PUBLIC_URL"].startswith("https://")
    namespace = find(prod, "Namespace", "mailroom")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


# What k8s/overlays/prod sets for HTTPS (messaging_platform/settings.py reads them).
PROD_HTTPS = {
    "SESSION_COOKIE_SECURE": "true",
    "CSRF_COOKIE_SECURE": "true",
    "SECURE_SSL_REDIRECT": "true",
    "MAILROOM_TRUST_X_FORWARDED_PROTO": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
}


def test_prod_serves_https_only_and_dev_plain_http(rendered: dict[str, list[Obj]]) -> None:
    prod = config_map(rendered["prod"])
    for name, value in PROD_HTTPS.items():
        assert prod.get(name) == value, name
    assert prod["CSRF_TRUSTED_ORIGINS"].split(",") == [prod["MAILROOM_PUBLIC_URL"]]
    # The dev overlay is reached through `kubectl port-forward`, over http.
    dev = config_map(rendered["dev"])
    assert not {name for name in (*PROD_HTTPS, "CSRF_TRUSTED_ORIGINS") if name in dev}


def test_check_deploy_finds_no_https_warning_in_the_prod_config(
    rendered: dict[str, list[Obj]],
) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "DJANGO_SETTINGS_MODULE": "messaging_platform.settings",
        # From mailroom-secrets in the cluster.
        "SECRET_KEY": secrets.token_urlsafe(50),
        **config_map(rendered["prod"]),
    }
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=REPO / "services" / "mailroom",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    found = set(re.findall(r"security\.W\d+", proc.stdout + proc.stderr))
    # W021: no HSTS preload, on purpose (see the overlay).
    assert found <= {"security.W021"}, proc.stdout + proc.stderr


def test_images_are_pinned(rendered: dict[str, list[Obj]]) -> None:
    for overlay, obj in _objects(rendered):
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = pod_spec(obj)
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            tag = image.rpartition(":")[2] if ":" in image else ""
            assert tag not in ("", "latest"), (overlay, image)
