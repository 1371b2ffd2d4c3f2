"""The Kubernetes manifests (deploy/k8s), rendered by kustomize, checked against the schemas and the code.

Each overlay (and the base) is rendered by kustomize (``kubectl kustomize``) and every object
is validated against the Kubernetes OpenAPI schemas in strict mode (``kubernetes-validate``:
unknown fields are errors). Then the manifests are checked against the services themselves:
the command is a real ``orbion`` CLI invocation for that service, every ``ORBION_*`` variable
a container gets is a setting of that service, the settings built from that environment put
the HTTP server on the port the probes and the Service use, and the probe paths are answered
by the app every service is built on. The rest pins what the deployment promises: security
context, graceful shutdown longer than a drain, autoscaling, disruption budgets, a network
policy under which only the gateway is reachable from outside, and the migrations Job.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest

from orbion_common.bus import ConsumerSpec
from orbion_common.cli import build_parser
from orbion_common.service import PROBE_PATHS, ServiceServer, create_service_app
from orbion_common.settings import CommonSettings
from orbion_common.telemetry import finish_tasks
from orbion_llm_proxy.bootstrap import WORKERS_STOP_GRACE_SECONDS

# Oldest Kubernetes the manifests support (docs/deploy.md); schemas are checked at this version.
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ("base", "dev", "prod")
CONSUMERS = ("conversation", "lead", "llm-proxy")
Doc = dict[str, Any]
SettingsFromEnv = Callable[[str, Mapping[str, str]], CommonSettings]


def containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def named_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Label selector semantics (matchLabels and matchExpressions); {} selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@pytest.fixture(scope="module")
def probe_status() -> dict[str, int]:
    """Status of each probe path on a live app built by create_service_app (every service's shell)."""
    app = create_service_app("deploy-check", CommonSettings())

    async def fetch() -> dict[str, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
            return {path: (await client.get(path)).status_code for path in PROBE_PATHS}

    import asyncio

    return asyncio.run(fetch())


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_for_kubernetes(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[overlay]
    assert docs, f"{overlay} rendered nothing"
    for doc in docs:
        where = f"{overlay}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where} is invalid at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


def test_the_schema_check_rejects_a_misspelt_field(
    rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    deployment = copy.deepcopy(kit.by_kind(rendered["prod"], "Deployment")["gateway"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------- services and the code


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_has_a_deployment_a_service_and_a_disruption_budget(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    docs = rendered[overlay]
    deployments = kit.by_kind(docs, "Deployment")
    services = kit.by_kind(docs, "Service")
    pdbs = kit.by_kind(docs, "PodDisruptionBudget")
    assert set(deployments) == set(kit.SERVICES)
    for name in kit.SERVICES:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert selects(deployments[name]["spec"]["selector"], labels), f"{name}: selector misses its pods"
        assert selects({"matchLabels": services[name]["spec"]["selector"]}, labels), f"Service {name}"
        pods_of = [
            d
            for d, dep in deployments.items()
            if selects(pdbs[name]["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
        ]
        assert pods_of == [name], f"PodDisruptionBudget {name} selects {pods_of}"
        target = services[name]["spec"]["ports"][0]["targetPort"]
        named_port(deployments[name]["spec"]["template"]["spec"]["containers"][0], target)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_are_orbion_cli_calls_for_their_service(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    parser = build_parser()
    for name, deployment in kit.by_kind(rendered[overlay], "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"][0] == "orbion"
        args = parser.parse_args(container["command"][1:] + container.get("args", []))
        assert (args.command, args.service) == ("serve", name)
        assert container["image"].split("/")[-1].split(":")[0] == f"orbion-{name}"


def _has_migrations(service: str) -> bool:
    spec = importlib.util.find_spec(f"orbion_{service.replace('-', '_')}")
    assert spec is not None and spec.submodule_search_locations
    return any(any((Path(f) / "migrations").glob("*.sql")) for f in spec.submodule_search_locations)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_job_migrates_every_service_with_a_schema_in_its_own_image(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    job = kit.by_kind(rendered[overlay], "Job")["orbion-migrate"]
    parser = build_parser()
    migrated: dict[str, str] = {}
    for container in containers(job):
        args = parser.parse_args(container["command"][1:] + container.get("args", []))
        assert args.command == "migrate" and len(args.services) == 1, container["command"]
        (service,) = args.services
        migrated[service] = container["image"].split("/")[-1].split(":")[0]
        env = kit.ContainerEnv(container, rendered[overlay])
        # `orbion migrate` starts local servers for any URL left unset: all three must be set.
        assert {"ORBION_NATS_URL", "ORBION_DATABASE_URL", "ORBION_REDIS_URL"} <= env.names()
    expected = {svc for svc in kit.SERVICES if _has_migrations(svc)}
    assert set(migrated) == expected
    assert all(image == f"orbion-{svc}" for svc, image in migrated.items())
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_orbion_variable_is_a_setting_of_the_service_that_gets_it(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    docs = rendered[overlay]
    workloads = {**kit.by_kind(docs, "Deployment"), **kit.by_kind(docs, "Job")}
    for workload in workloads.values():
        for container in containers(workload):
            service = container["image"].split("/")[-1].split(":")[0].removeprefix("orbion-")
            env = kit.ContainerEnv(container, docs)
            assert not env.missing, f"{container['name']}: {env.missing}"
            unknown = {n for n in env.names() if n.startswith("ORBION_")} - kit.env_names(service)
            assert not unknown, f"{container['name']} ({service}) gets variables it never reads: {unknown}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_setting_shared_by_services_has_one_value(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    seen: dict[str, dict[str, str]] = {}
    docs = rendered[overlay]
    for name, deployment in kit.by_kind(docs, "Deployment").items():
        for var, value in kit.ContainerEnv(containers(deployment)[0], docs).values.items():
            seen.setdefault(var, {})[name] = value
    # The monitor alone turns its own trace export off (it is the receiver).
    seen.pop("ORBION_OTLP_ENDPOINT", None)
    differing = {var: by_svc for var, by_svc in seen.items() if len(set(by_svc.values())) > 1}
    assert not differing


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_settings_each_pod_reads(
    overlay: str,
    rendered: dict[str, list[Doc]],
    kit: SimpleNamespace,
    settings_from_env: SettingsFromEnv,
    probe_status: dict[str, int],
) -> None:
    docs = rendered[overlay]
    services = kit.by_kind(docs, "Service")
    for name, deployment in kit.by_kind(docs, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        settings = settings_from_env(name, kit.ContainerEnv(container, docs).values)
        port = settings.service_port(name)
        assert settings.host == "0.0.0.0", f"{name} would listen on {settings.host} only"
        assert [p["containerPort"] for p in container["ports"]] == [port]
        service_port = services[name]["spec"]["ports"][0]
        assert named_port(container, service_port["targetPort"]) == port
        routes = kit.app_routes(name)
        expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
        for probe_name, path in expected.items():
            probe = container[probe_name]["httpGet"]
            assert probe["path"] == path, f"{name} {probe_name}"
            assert named_port(container, probe["port"]) == port, f"{name} {probe_name} port"
            assert ("GET", path) in routes, f"{name} does not serve {path}"
            assert probe_status[path] == 200, f"{path} answers {probe_status[path]} on a healthy app"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitor_polls_the_services_and_receives_their_traces(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace, settings_from_env: SettingsFromEnv
) -> None:
    docs = rendered[overlay]
    services = kit.by_kind(docs, "Service")
    deployments = kit.by_kind(docs, "Deployment")
    monitor_env = kit.ContainerEnv(containers(deployments["monitor"])[0], docs).values
    targets = json.loads(monitor_env["ORBION_MONITOR_TARGETS"])
    assert set(targets) == set(kit.SERVICES) - {"monitor"}
    for name, url in targets.items():
        parts = urlsplit(url)
        assert parts.hostname == name and parts.port == services[name]["spec"]["ports"][0]["port"], url
    monitor_port = services["monitor"]["spec"]["ports"][0]["port"]
    assert ("POST", "/v1/traces") in kit.app_routes("monitor")
    for name, deployment in deployments.items():
        endpoint = kit.ContainerEnv(containers(deployment)[0], docs).values.get("ORBION_OTLP_ENDPOINT", "")
        if name == "monitor":
            assert endpoint == "", "the monitor must not export its own spans to itself (a loop)"
        else:
            parts = urlsplit(endpoint)
            assert (parts.hostname, parts.port, parts.path) == ("monitor", monitor_port, "/v1/traces")


# --------------------------------------------------------------------------- operations


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_on_a_read_only_root(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    docs = rendered[overlay]
    for name, workload in {**kit.by_kind(docs, "Deployment"), **kit.by_kind(docs, "Job")}.items():
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in containers(workload):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert not ctx.get("privileged"), name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be a writable emptyDir"
            env = kit.ContainerEnv(container, docs).values
            data_dir = env.get("ORBION_DATA_DIR", str(CommonSettings.model_fields["data_dir"].default))
            assert data_dir in mounts, f"{name}: ORBION_DATA_DIR {data_dir} is not a writable volume"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
                resources["limits"]
            ), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_grace_outlasts_prestop_and_drain(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    # What a stopping pod does, from the code: HTTP graceful stop, then in-flight events
    # finish within their ack wait, then the loops that commit (the llm-proxy's sender the
    # longest) and the relay end, and NATS drains.
    http_graceful = inspect.signature(ServiceServer.__init__).parameters["graceful_seconds"].default
    ack_wait = ConsumerSpec.__dataclass_fields__["ack_wait_seconds"].default
    loops = WORKERS_STOP_GRACE_SECONDS + inspect.signature(finish_tasks).parameters["grace"].default
    for name, deployment in kit.by_kind(rendered[overlay], "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", f"{name}: preStop should wait for endpoint removal"
        pre_stop = float(command[1])
        assert spec["terminationGracePeriodSeconds"] > pre_stop + http_graceful + ack_wait + loops, name
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        # Migrations run before the HTTP server starts: give them minutes, not seconds.
        assert budget >= 120, f"{name}: startupProbe allows only {budget}s"
        strategy = deployment["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, f"{name}: rollouts must not drop capacity"


def test_dev_runs_one_replica_and_the_infrastructure_in_cluster(
    rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    docs = rendered["dev"]
    assert all(d["spec"]["replicas"] == 1 for d in kit.by_kind(docs, "Deployment").values())
    assert not kit.by_kind(docs, "HorizontalPodAutoscaler")
    statefulsets = kit.by_kind(docs, "StatefulSet")
    assert set(statefulsets) == {"nats", "postgres", "redis"}
    services = kit.by_kind(docs, "Service")
    secrets = [d for d in docs if d["kind"] == "Secret"]
    assert len(secrets) == 1 and secrets[0]["metadata"]["name"].startswith("orbion-connections")
    for deployment in kit.by_kind(docs, "Deployment").values():
        env = kit.ContainerEnv(containers(deployment)[0], docs).values
        for var in ("ORBION_NATS_URL", "ORBION_DATABASE_URL", "ORBION_REDIS_URL"):
            if var not in env:
                continue
            url = urlsplit(env[var])
            assert url.password is None, f"{var} carries a password in a committed file"
            assert url.hostname in statefulsets, f"{var} points at {url.hostname}, not in-cluster"
            assert url.port in [p["port"] for p in services[url.hostname]["spec"]["ports"]], var


def test_prod_scales_out_and_uses_external_infrastructure(
    rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    docs = rendered["prod"]
    assert not kit.by_kind(docs, "StatefulSet")
    assert not [d for d in docs if d["kind"] == "Secret"], "no secret is committed for production"
    deployments = kit.by_kind(docs, "Deployment")
    hpas = kit.by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"gateway", *CONSUMERS}
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], f"{name}: survive a node loss"
        # A fixed count would be re-applied by every `kubectl apply`, scaling down mid-peak.
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns the replica count"
        metrics = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
        assert "cpu" in metrics
        requests = deployments[name]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert "cpu" in requests, f"{name}: CPU utilisation needs a CPU request"
    assert deployments["monitor"]["spec"]["replicas"] == 1, "the monitor aggregates in memory"
    config = kit.by_kind(docs, "ConfigMap")["orbion-config"]["data"]
    assert config["ORBION_MODE"] == "production"
    ingress = kit.by_kind(docs, "Ingress")["gateway"]
    backends = {p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    assert backends == {"gateway"}
    paths = [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    gateway_routes = {path for _, path in kit.app_routes("gateway")}
    for prefix in paths:
        assert any(route.startswith(prefix) for route in gateway_routes), f"ingress {prefix} reaches no route"
        assert not any(probe.startswith(prefix) for probe in PROBE_PATHS), "probes must stay internal"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_is_reachable_from_outside(
    overlay: str, rendered: dict[str, list[Doc]], kit: SimpleNamespace
) -> None:
    docs = rendered[overlay]
    pods = {
        name: w["spec"]["template"]["metadata"]["labels"]
        for kind in ("Deployment", "StatefulSet")
        for name, w in kit.by_kind(docs, kind).items()
    }
    policies = [p for p in docs if p["kind"] == "NetworkPolicy"]
    isolated = {
        name
        for name, labels in pods.items()
        if any(
            "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
            for p in policies
        )
    }
    assert isolated == set(pods), f"pods without an ingress policy accept anything: {set(pods) - isolated}"
    reachable_from_outside: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            # No peers, an IP block or another namespace: traffic from outside this namespace.
            external = not peers or any("ipBlock" in p or "namespaceSelector" in p for p in peers)
            if external:
                reachable_from_outside |= {
                    n for n, labels in pods.items() if selects(policy["spec"]["podSelector"], labels)
                }
    assert reachable_from_outside == {"gateway"}
