"""docker-compose.yml and compose.demo.yml, checked against the Compose specification and the code.

Each file is validated against the Compose Specification JSON schema (vendored, see
schemas/README.md) and, after interpolation with .env.example, parsed by ``compose-spec``
(a strict parser of the current specification). Then against the services: each ORBION
service builds its own image and runs ``orbion serve <itself>``; every ``ORBION_*`` variable
it gets is one of its settings; the settings built from that environment put the server on
the port that is published and health-checked; it waits for healthy servers; the collector
feeds the monitor's OTLP route; and the demo points the llm-proxy at fakes that exist.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from compose_spec import PyCompose

from orbion_common.bus import ConsumerSpec
from orbion_common.cli import build_parser
from orbion_common.service import ServiceServer
from orbion_common.settings import CommonSettings
from orbion_common.telemetry import finish_tasks
from orbion_llm_proxy.bootstrap import WORKERS_STOP_GRACE_SECONDS

SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
FILES = ("docker-compose.yml", "compose.demo.yml")
PROJECTS = ("default", "demo")
URL_SETTINGS = ("ORBION_NATS_URL", "ORBION_DATABASE_URL", "ORBION_REDIS_URL")
Doc = dict[str, Any]
SettingsFromEnv = Callable[[str, Mapping[str, str]], CommonSettings]
HEALTH_URL = re.compile(r"http://127\.0\.0\.1:(?P<port>\d+)(?P<path>/[\w/]*)")


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # The file names draft 2019-09 by a non-canonical URI; say so rather than let it be guessed.
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def published_container_ports(service: Doc) -> list[int]:
    ports = []
    for entry in service.get("ports", []):
        text = str(entry["target"] if isinstance(entry, dict) else entry)
        ports.append(int(text.rsplit(":", 1)[-1].split("/")[0]))
    return ports


# --------------------------------------------------------------------------- specification


@pytest.mark.parametrize("name", FILES)
def test_file_follows_the_compose_schema(
    name: str, compose_raw: dict[str, Doc], validator: jsonschema.protocols.Validator
) -> None:
    errors = sorted(validator.iter_errors(compose_raw[name]), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("project", PROJECTS)
def test_project_parses_under_the_current_specification(
    project: str, compose_projects: dict[str, Doc]
) -> None:
    parsed = PyCompose.from_json(json.dumps(compose_projects[project]))
    assert set(parsed.service_names()) == set(compose_projects[project]["services"])


def test_both_checks_reject_a_misspelt_key(
    compose_raw: dict[str, Doc], compose_projects: dict[str, Doc], validator: jsonschema.protocols.Validator
) -> None:
    raw = copy.deepcopy(compose_raw["docker-compose.yml"])
    raw["services"]["gateway"]["helthcheck"] = raw["services"]["gateway"].pop("healthcheck")
    assert list(validator.iter_errors(raw))
    project = copy.deepcopy(compose_projects["default"])
    project["services"]["gateway"]["depends_on"]["nats"]["condition"] = "service_ready"
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(project))


# --------------------------------------------------------------------------- services and the code


@pytest.mark.parametrize("project", PROJECTS)
def test_each_service_builds_its_own_image_and_serves_itself(
    project: str, compose_projects: dict[str, Doc], kit: SimpleNamespace
) -> None:
    parser = build_parser()
    services = compose_projects[project]["services"]
    for name in kit.SERVICES:
        service = services[name]
        assert service["build"]["args"]["SERVICE"] == name
        assert service["image"].split(":")[0] == f"orbion-{name}"
        args = parser.parse_args(service["command"][1:])
        assert service["command"][0] == "orbion" and (args.command, args.service) == ("serve", name)


@pytest.mark.parametrize("project", PROJECTS)
def test_every_orbion_variable_is_a_setting_of_its_service(
    project: str, compose_projects: dict[str, Doc], kit: SimpleNamespace
) -> None:
    services = compose_projects[project]["services"]
    for name in kit.SERVICES:
        env = kit.service_environment(services[name])
        unknown = {var for var in env if var.startswith("ORBION_")} - kit.env_names(name)
        assert not unknown, f"{name} gets variables it never reads: {unknown}"


@pytest.mark.parametrize("project", PROJECTS)
def test_published_port_and_healthcheck_match_the_settings(
    project: str, compose_projects: dict[str, Doc], kit: SimpleNamespace, settings_from_env: SettingsFromEnv
) -> None:
    services = compose_projects[project]["services"]
    for name in kit.SERVICES:
        service = services[name]
        settings = settings_from_env(name, kit.service_environment(service))
        port = settings.service_port(name)
        assert settings.host == "0.0.0.0", f"{name} would listen on {settings.host} only"
        assert published_container_ports(service) == [port], name
        match = HEALTH_URL.search(" ".join(service["healthcheck"]["test"]))
        assert match, f"{name}: healthcheck calls no local URL"
        assert int(match["port"]) == port, f"{name}: healthcheck probes port {match['port']}, serves {port}"
        assert match["path"] == "/readyz" and ("GET", "/readyz") in kit.app_routes(name)


@pytest.mark.parametrize("project", PROJECTS)
def test_services_wait_for_the_servers_they_use_to_be_healthy(
    project: str, compose_projects: dict[str, Doc], kit: SimpleNamespace
) -> None:
    services = compose_projects[project]["services"]
    for name in kit.SERVICES:
        env = kit.service_environment(services[name])
        depends = services[name].get("depends_on", {})
        for var in URL_SETTINGS:
            if env.get(var):
                host = urlsplit(env[var]).hostname
                assert host in services, f"{name}: {var} points at {host}, not a compose service"
                assert depends.get(host, {}).get("condition") == "service_healthy", f"{name} -> {host}"
    for name, service in services.items():
        for target, how in (service.get("depends_on") or {}).items():
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}: no healthcheck"


@pytest.mark.parametrize("project", PROJECTS)
def test_services_run_unprivileged_on_a_read_only_root(
    project: str, compose_projects: dict[str, Doc], kit: SimpleNamespace
) -> None:
    services = compose_projects[project]["services"]
    for name in kit.SERVICES:
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert int(service["user"].split(":")[0]) != 0, name
        data_dir = kit.service_environment(service)["ORBION_DATA_DIR"]
        assert {"/tmp", data_dir} <= set(service["tmpfs"]), f"{name}: /tmp and {data_dir} must be writable"


def test_interpolated_variables_are_documented_in_env_example(
    compose_raw: dict[str, Doc], env_example: dict[str, str], kit: SimpleNamespace
) -> None:
    used = {var for doc in compose_raw.values() for s in strings(doc) for var in kit.compose_variables(s)}
    assert used == set(env_example), (
        f"undocumented: {used - set(env_example)}; documented but unused: {set(env_example) - used}"
    )
    every_setting = set().union(*(kit.env_names(s) for s in kit.SERVICES))
    assert {v for v in env_example if v.startswith("ORBION_") and v != "ORBION_IMAGE_TAG"} <= every_setting


# --------------------------------------------------------------------------- tracing


def test_collector_feeds_the_monitor_and_jaeger(
    compose_projects: dict[str, Doc], kit: SimpleNamespace, settings_from_env: SettingsFromEnv
) -> None:
    services = compose_projects["default"]["services"]
    collector = services["otel-collector"]
    config_arg = next(a for a in collector["command"] if a.startswith("--config="))
    mounted = {v.split(":")[1]: v.split(":")[0] for v in collector["volumes"]}
    config_file = kit.REPO / mounted[config_arg.removeprefix("--config=")]
    config = yaml.safe_load(config_file.read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    for section in ("receivers", "processors", "exporters"):
        missing = set(pipeline[section]) - set(config[section])
        assert not missing, f"pipeline uses undefined {section}: {missing}"
    http_endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    receiver_port = int(http_endpoint.rsplit(":", 1)[1])

    monitor_settings = settings_from_env("monitor", kit.service_environment(services["monitor"]))
    exporters = {name: config["exporters"][name] for name in pipeline["exporters"]}
    hosts = {
        urlsplit(e["endpoint"] if "://" in e["endpoint"] else f"grpc://{e['endpoint']}").hostname: e
        for e in exporters.values()
    }
    assert {"monitor", "jaeger"} <= set(hosts) and set(hosts) <= set(services)
    monitor_url = urlsplit(hosts["monitor"]["endpoint"])
    assert monitor_url.port == monitor_settings.service_port("monitor")
    # otlphttp appends /v1/traces to the endpoint: the monitor must serve exactly that.
    assert ("POST", monitor_url.path.rstrip("/") + "/v1/traces") in kit.app_routes("monitor")

    for name in kit.SERVICES:
        endpoint = kit.service_environment(services[name]).get("ORBION_OTLP_ENDPOINT", "")
        if name == "monitor":
            assert endpoint == "", "the monitor must not export its own spans (a loop via the collector)"
            continue
        url = urlsplit(endpoint)
        assert (url.hostname, url.port, url.path) == ("otel-collector", receiver_port, "/v1/traces"), name


# --------------------------------------------------------------------------- demo


def test_demo_points_the_llm_proxy_at_fakes_that_exist(
    compose_raw: dict[str, Doc], compose_projects: dict[str, Doc], kit: SimpleNamespace
) -> None:
    demo = compose_projects["demo"]["services"]
    fakes = {name: svc for name, svc in demo.items() if name.startswith("fake-")}
    assert set(fakes) >= {"fake-openai", "fake-whatsapp"}
    listening: dict[str, int] = {}
    for name, fake in fakes.items():
        command = fake["command"]
        assert command[:2] == ["python", "-m"]
        module = command[2]
        source = kit.REPO / (module.replace(".", "/") + ".py")
        assert source.exists(), f"{name} runs {module}, which does not exist"
        assert "def main(" in source.read_text()
        mounts = {v.split(":")[1]: v.split(":")[0] for v in fake["volumes"]}
        mounted_at = mounts[f"{fake['working_dir']}/tests/fakes"]
        assert (kit.REPO / mounted_at).resolve() == (kit.REPO / "tests" / "fakes").resolve()
        listening[name] = int(command[command.index("--port") + 1])
        assert command[command.index("--host") + 1] == "0.0.0.0"
        assert str(listening[name]) in " ".join(fake["healthcheck"]["test"])

    env = kit.service_environment(demo["llm-proxy"])
    depends = demo["llm-proxy"]["depends_on"]
    pointed = {"ORBION_OPENAI_BASE_URL": "fake-openai", "ORBION_WHATSAPP_API_BASE_URL": "fake-whatsapp"}
    for var, fake in pointed.items():
        url = urlsplit(env[var])
        assert (url.hostname, url.port) == (fake, listening[fake]), var
        assert depends[fake]["condition"] == "service_healthy"
    whatsapp = fakes["fake-whatsapp"]["command"]
    assert whatsapp[whatsapp.index("--token") + 1] == env["ORBION_WHATSAPP_TOKEN"]
    # The demo never leaks into the plain project.
    assert not any(name.startswith("fake-") for name in compose_raw["docker-compose.yml"]["services"])


def test_stop_grace_outlasts_the_drain(compose_projects: dict[str, Doc], kit: SimpleNamespace) -> None:
    http_graceful = inspect.signature(ServiceServer.__init__).parameters["graceful_seconds"].default
    ack_wait = ConsumerSpec.__dataclass_fields__["ack_wait_seconds"].default
    # Then the loops that commit (the llm-proxy's sender the longest) and the relay end.
    loops = WORKERS_STOP_GRACE_SECONDS + inspect.signature(finish_tasks).parameters["grace"].default
    for name in kit.SERVICES:
        grace = compose_projects["default"]["services"][name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > http_graceful + ack_wait + loops, name
