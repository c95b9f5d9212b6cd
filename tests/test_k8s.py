"""Offline checks of the Kubernetes manifests (k8s/) and the Dockerfile.

Every kustomization (the base and each overlay) is rendered with the real `kubectl kustomize`
(Debian's `kubectl` package, which `.ci/run` installs; without it the render checks are skipped
and the pytest summary says why). Then:

- every rendered object validates against the Kubernetes JSON schemas of a pinned version, strictly
  (unknown fields are errors), with the `kubernetes-validate` package (schemas ship in the wheel);
- every container runs non-root on a read-only root filesystem, without privilege escalation or
  capabilities, under seccomp RuntimeDefault, with CPU/memory requests and limits;
- the gRPC services use native `grpc:` probes (readiness on their proto service name), the edge
  uses /readyz and /healthz;
- terminationGracePeriodSeconds > preStop sleep + `shutdown_grace` of the mounted config;
- the Ingress keeps SSE unbuffered, its read/send timeouts exceed `edge.heartbeat` and
  `edge.request_timeout`, its body limit is not below `edge.max_body_bytes`;
- the ConfigMap's config loads with the real loader (`promptline.config.load_config`), its
  targets/listen/redis_url match the Services and container ports, its tenant keys are digests,
  with `on_redis_error: local` its `quota_policy.replicas` is within the prompt HPA's bounds;
- HPAs and PDBs cover every service; every referenced ConfigMap/Secret exists;
- the external-Redis overlays are prod without the in-cluster Redis, the prompt and llm-engine
  pods (and no other) get the mode (and sentinels) as env and the URL from a Secret, and the
  config they see parses, the same for both;
- the Dockerfile generates the protobuf code and runs as the uid the pods require.

Each check is a function returning a list of problems; `test_checks_catch_breakage` feeds each one
a deliberately broken render to prove it can fail.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from promptline.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "local": K8S / "overlays" / "local",
                  "prod": K8S / "overlays" / "prod",
                  "prod-redis-cluster": K8S / "overlays" / "prod-redis-cluster",
                  "prod-redis-sentinel": K8S / "overlays" / "prod-redis-sentinel"}
# The overlays that reuse prod with an external Redis instead of the in-cluster one: mode.
EXTERNAL_REDIS = {"prod-redis-cluster": "cluster", "prod-redis-sentinel": "sentinel"}
# The services that reach Redis: quotas, prompts, conversations; the provider pools' state.
REDIS_CLIENTS = ("services.prompt", "services.llm_engine")
# Oldest Kubernetes we support: native gRPC probes are GA since 1.27, autoscaling/v2 since 1.23.
K8S_VERSION = "1.30.0"
APP_UID = 10001
APP_MODULES = {"services.edge_http": "edge_http", "services.prompt": "prompt",
               "services.llm_engine": "llm_engine"}
GRPC_MODULES = {"services.prompt": "prompt.proto", "services.llm_engine": "llm_engine.proto"}
# Secrets that an overlay expects to be created out of band (never rendered from git).
OUT_OF_BAND_SECRETS = {"prod": {"promptline-provider-keys"},
                       **{name: {"promptline-provider-keys", "promptline-redis"}
                          for name in EXTERNAL_REDIS}}
# Stand-ins for values of those Secrets that the config reads, to load it as a pod sees it.
SECRET_SAMPLES = {("promptline-redis", "PROMPTLINE_REDIS_URL"):
                  "rediss://:s3cret@node-0.redis.example.internal:6379/0"}
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "ash", "/bin/ash", "dash"}
DEV_KEY_DIGEST = hashlib.sha256(b"dev-key").hexdigest()

Obj = dict[str, Any]
Problems = list[str]


# ==============================================================================================
# Rendering: the real `kubectl kustomize`

KUBECTL = shutil.which("kubectl")
NO_KUBECTL = ("k8s render checks skipped: kubectl is not installed, and k8s/ is rendered with "
              "`kubectl kustomize` (apt-get install kubectl; .ci/run installs it)")

_RENDERS: dict[str, list[Obj]] = {}


def render(name: str) -> list[Obj]:
    """The objects `kubectl kustomize` renders from a kustomization (cached per session; each
    caller gets its own copy to change)."""
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    if name not in _RENDERS:
        directory = KUSTOMIZATIONS[name]
        out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True,
                             text=True, timeout=120, check=False)
        assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
        _RENDERS[name] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return copy.deepcopy(_RENDERS[name])


# ==============================================================================================
# Helpers over rendered objects


def _pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def _containers(obj: Obj) -> list[Obj]:
    spec = _pod_spec(obj)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _by_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def _named(objs: list[Obj], kind: str, name: str) -> Obj | None:
    return next((o for o in _by_kind(objs, kind) if o["metadata"]["name"] == name), None)


def _module(container: Obj) -> str | None:
    """The service module a promptline container runs (`args` after ENTRYPOINT python -m)."""
    args = container.get("args", [])
    return args[0] if args and args[0] in APP_MODULES else None


def app_deployments(objs: list[Obj]) -> dict[str, tuple[Obj, Obj]]:
    """module -> (Deployment, its promptline container)."""
    found: dict[str, tuple[Obj, Obj]] = {}
    for dep in _by_kind(objs, "Deployment"):
        for container in _containers(dep):
            module = _module(container)
            if module:
                found[module] = (dep, container)
    return found


def _port_number(container: Obj, port: Any) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _service_for(objs: list[Obj], host: str) -> Obj | None:
    short = host.split(".")[0]  # `prompt`, `prompt.ns`, `prompt.ns.svc.cluster.local`
    return _named(objs, "Service", short)


def _duration_annotation(value: str | None) -> float | None:
    """ingress-nginx timeouts are plain seconds."""
    return float(value) if value is not None and re.fullmatch(r"\d+", value) else None


def _size_bytes(value: str | None) -> int | None:
    """nginx sizes: 1024, 512k, 2m, 1g."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value or "")
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[
        match.group(2).lower()]


def container_env(container: Obj) -> dict[str, str]:
    """The container's env as the process sees it: literal values, and Secret keys from
    SECRET_SAMPLES."""
    env = {}
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if "value" in var:
            env[var["name"]] = var["value"]
        elif ref and (ref["name"], ref["key"]) in SECRET_SAMPLES:
            env[var["name"]] = SECRET_SAMPLES[ref["name"], ref["key"]]
    return env


def mounted_config(objs: list[Obj], tmp: Path) -> tuple[Config | None, Obj | None, Problems]:
    """The config the app pods read (PROMPTLINE_CONFIG -> mount -> ConfigMap), loaded for real."""
    problems: Problems = []
    sources = set()
    for module, (dep, container) in app_deployments(objs).items():
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        path = env.get("PROMPTLINE_CONFIG")
        if not path:
            problems.append(f"{module}: PROMPTLINE_CONFIG is not set")
            continue
        mount = next((m for m in container.get("volumeMounts", [])
                      if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        if mount is None:
            problems.append(f"{module}: nothing is mounted at {path}")
            continue
        key = path[len(mount["mountPath"].rstrip("/")) + 1:]
        vol = next((v for v in _pod_spec(dep).get("volumes", [])
                    if v["name"] == mount["name"]), {})
        if "configMap" not in vol:
            problems.append(f"{module}: volume {mount['name']} is not a ConfigMap")
            continue
        sources.add((vol["configMap"]["name"], key))
    if len(sources) != 1:
        return None, None, [*problems, f"the services read different configs: {sorted(sources)}"]
    cm_name, key = sources.pop()
    cm = _named(objs, "ConfigMap", cm_name)
    if cm is None or key not in cm.get("data", {}):
        return None, None, [*problems, f"ConfigMap {cm_name} with key {key} is not rendered"]
    file = tmp / key
    file.write_text(cm["data"][key], encoding="utf-8")
    # env={}: the test runner's environment must not leak overrides into the check.
    return load_config(file, env={}), yaml.safe_load(cm["data"][key]), problems


# ==============================================================================================
# Checks: each returns the problems it finds (an empty list is a pass)


def check_schemas(objs: list[Obj]) -> Problems:
    problems = []
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{where}: {path}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    return problems


def check_hardening(objs: list[Obj]) -> Problems:
    problems = []
    for obj in objs:
        spec = _pod_spec(obj)
        if spec is None:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: host namespaces are not allowed")
        for c in _containers(obj):
            cw = f"{where}/{c['name']}"
            sc = {**pod_sc, **c.get("securityContext", {})}
            if sc.get("runAsNonRoot") is not True:
                problems.append(f"{cw}: runAsNonRoot must be true")
            if sc.get("runAsUser") == 0:
                problems.append(f"{cw}: runAsUser 0")
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem must be true")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                problems.append(f"{cw}: privileged")
            caps = c.get("securityContext", {}).get("capabilities", {})
            if "ALL" not in caps.get("drop", []) or caps.get("add"):
                problems.append(f"{cw}: capabilities must drop ALL and add none")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                problems.append(f"{cw}: seccompProfile must be RuntimeDefault")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{cw}: resources.{kind}.{r} is missing")
            if _module(c) and sc.get("runAsUser") != APP_UID:
                problems.append(f"{cw}: runAsUser must be the image's uid {APP_UID}")
            if ":" not in c["image"].rsplit("/", 1)[-1] or c["image"].endswith(":latest"):
                problems.append(f"{cw}: image {c['image']!r} needs a pinned tag")
    return problems


def _proto_service(proto_file: str) -> str:
    text = (ROOT / "protos" / "promptline" / "v1" / proto_file).read_text(encoding="utf-8")
    package = re.search(r"^package\s+([\w.]+);", text, re.M).group(1)
    service = re.search(r"^service\s+(\w+)", text, re.M).group(1)
    return f"{package}.{service}"


def check_probes(objs: list[Obj], config: Config) -> Problems:
    problems = []
    apps = app_deployments(objs)
    for module in APP_MODULES:
        if module not in apps:
            problems.append(f"no Deployment runs {module}")
    listen_port = {"services.edge_http": config.listen.edge_http,
                   "services.prompt": config.listen.prompt,
                   "services.llm_engine": config.listen.llm_engine}
    for module, (dep, c) in apps.items():
        where = f"Deployment/{dep['metadata']['name']}"
        port = int(listen_port[module].rsplit(":", 1)[1])
        if port not in [p["containerPort"] for p in c.get("ports", [])]:
            problems.append(f"{where}: the config listens on {port}, not a container port")
        for probe in ("readinessProbe", "livenessProbe"):
            spec = c.get(probe)
            if spec is None:
                problems.append(f"{where}: no {probe}")
                continue
            if module in GRPC_MODULES:
                grpc = spec.get("grpc")
                if grpc is None:
                    problems.append(f"{where}: {probe} must be a native grpc probe")
                    continue
                if grpc.get("port") != port:
                    problems.append(f"{where}: {probe} probes port {grpc.get('port')}, "
                                    f"the server listens on {port}")
                if probe == "readinessProbe" and grpc.get("service") != _proto_service(
                        GRPC_MODULES[module]):
                    problems.append(f"{where}: readiness must check the health of "
                                    f"{_proto_service(GRPC_MODULES[module])}")
            else:
                path = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}[probe]
                http = spec.get("httpGet", {})
                if http.get("path") != path or _port_number(c, http.get("port")) != port:
                    problems.append(f"{where}: {probe} must GET {path} on port {port}")
    return problems


def _prestop_sleep(container: Obj) -> tuple[float | None, str | None]:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep")
    if sleep is not None:
        return float(sleep["seconds"]), None
    if not command:
        return None, "no preStop hook (endpoints must be removed before SIGTERM)"
    if command[0] in SHELLS:
        return None, f"preStop runs a shell ({command[0]}); the image needs none"
    match = re.search(r"time\.sleep\((\d+(?:\.\d+)?)\)", " ".join(command))
    if command[0] not in ("python", "python3") or not match:
        return None, f"preStop {command} is not a python time.sleep"
    return float(match.group(1)), None


def check_termination(objs: list[Obj], config: Config) -> Problems:
    problems = []
    for module, (dep, c) in app_deployments(objs).items():
        where = f"Deployment/{dep['metadata']['name']}"
        sleep, problem = _prestop_sleep(c)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        grace = _pod_spec(dep).get("terminationGracePeriodSeconds", 30)
        if not grace > sleep + config.shutdown_grace:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} must exceed preStop "
                            f"{sleep:g}s + shutdown_grace {config.shutdown_grace:g}s ({module})")
    return problems


def check_ingress(objs: list[Obj], config: Config) -> Problems:
    problems = []
    ingresses = _by_kind(objs, "Ingress")
    if not ingresses:
        return ["no Ingress"]
    edge = app_deployments(objs).get("services.edge_http")
    for ing in ingresses:
        where = f"Ingress/{ing['metadata']['name']}"
        ann = ing["metadata"].get("annotations", {})
        pre = "nginx.ingress.kubernetes.io/"
        if ann.get(pre + "proxy-buffering") != "off":
            problems.append(f"{where}: proxy-buffering must be off for SSE")
        for name in ("proxy-read-timeout", "proxy-send-timeout"):
            value = _duration_annotation(ann.get(pre + name))
            if value is None:
                problems.append(f"{where}: {name} must be set in seconds")
                continue
            if not value > config.edge.heartbeat:
                problems.append(f"{where}: {name} {value:g}s must exceed edge.heartbeat "
                                f"{config.edge.heartbeat:g}s")
            if not value > config.edge.header_hold:
                problems.append(f"{where}: {name} {value:g}s must exceed edge.header_hold")
            # Strictly longer: at equality nginx's 504 races the edge's typed DEADLINE_EXCEEDED.
            if not value > config.edge.request_timeout:
                problems.append(f"{where}: {name} {value:g}s must exceed edge.request_timeout "
                                f"{config.edge.request_timeout:g}s")
        body = _size_bytes(ann.get(pre + "proxy-body-size"))
        if body is None or (body != 0 and body < config.edge.max_body_bytes):
            problems.append(f"{where}: proxy-body-size must be >= edge.max_body_bytes "
                            f"({config.edge.max_body_bytes})")
        for rule in ing["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                svc_ref = path["backend"]["service"]
                svc = _named(objs, "Service", svc_ref["name"])
                port = next((p for p in (svc or {}).get("spec", {}).get("ports", [])
                             if p.get("name") == svc_ref["port"].get("name")
                             or p["port"] == svc_ref["port"].get("number")), None)
                if svc is None or port is None or edge is None:
                    problems.append(f"{where}: backend {svc_ref} is not a rendered Service port")
                    continue
                dep, c = edge
                if not _selects(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]
                                ["labels"]) or _port_number(c, port["targetPort"]) != int(
                                    config.listen.edge_http.rsplit(":", 1)[1]):
                    problems.append(f"{where}: backend {svc_ref} does not reach the edge")
    return problems


def check_config(objs: list[Obj], config: Config, raw: Obj, *, expect_redis: bool) -> Problems:
    problems = []
    apps = app_deployments(objs)
    for key, target, module in (("targets.prompt", config.prompt_target, "services.prompt"),
                                ("targets.llm_engine", config.llm_engine_target,
                                 "services.llm_engine")):
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        svc = _service_for(objs, host)
        if target.startswith("dns:///") and svc is not None and \
                svc["spec"].get("clusterIP") != "None":
            problems.append(f"{key} {target}: dns:/// round-robin needs a headless Service")
        if svc is None:
            problems.append(f"{key} {target}: no Service named {host.split('.')[0]}")
            continue
        svc_port = next((p for p in svc["spec"]["ports"] if p["port"] == int(port)), None)
        if svc_port is None:
            problems.append(f"{key} {target}: Service {host} has no port {port}")
            continue
        dep, c = apps.get(module, ({}, {}))
        labels = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
        listen = int(getattr(config.listen, key.split(".")[1]).rsplit(":", 1)[1])
        if not _selects(svc["spec"].get("selector", {}), labels) or \
                _port_number(c, svc_port["targetPort"]) != listen:
            problems.append(f"{key} {target}: Service {host} does not reach the {module} pods "
                            f"on their listen port {listen}")
    for addr in (config.listen.edge_http, config.listen.prompt, config.listen.llm_engine):
        if not addr.startswith(("0.0.0.0:", "[::]:")):
            problems.append(f"listen {addr}: pods must listen on all interfaces")
    if config.redis_url is None:
        problems.append("redis_url is not set (the embedded Redis is for local runs only)")
    elif expect_redis:
        match = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", config.redis_url)
        svc = _service_for(objs, match.group(1)) if match else None
        port = int(match.group(2) or 6379) if match else None
        sts = _by_kind(objs, "StatefulSet")
        if svc is None or port not in [p["port"] for p in svc["spec"]["ports"]] or not any(
                _selects(svc["spec"].get("selector", {}),
                         s["spec"]["template"]["metadata"]["labels"]) for s in sts):
            problems.append(f"redis_url {config.redis_url}: no Service reaching a Redis "
                            "StatefulSet")
    prompt = apps.get("services.prompt")
    hpa = prompt and next((h["spec"] for h in _by_kind(objs, "HorizontalPodAutoscaler")
                           if h["spec"]["scaleTargetRef"]["name"] == prompt[0]["metadata"]["name"]),
                          None)
    replicas = config.quota_policy.replicas
    if config.quota_policy.on_redis_error == "local" and hpa and not (
            hpa.get("minReplicas", 1) <= replicas <= hpa["maxReplicas"]):
        problems.append(f"quota_policy.replicas {replicas}: each prompt replica enforces limit / "
                        f"replicas while Redis is down, but the HPA runs "
                        f"{hpa.get('minReplicas', 1)}-{hpa['maxReplicas']} of them")
    for i, tenant in enumerate(raw.get("tenants", [])):
        for j, key in enumerate(tenant.get("api_keys", [])):
            if not str(key).startswith("sha256:"):
                problems.append(f"tenants[{i}].api_keys[{j}]: plain key in a ConfigMap")
    engine = apps.get("services.llm_engine")
    for model in config.models:
        if not model.api_key_env:
            continue
        if engine is None:
            problems.append(f"model {model.name}: no llm_engine Deployment for its key")
            continue
        _, c = engine
        direct = any(e["name"] == model.api_key_env and "secretKeyRef" in e.get("valueFrom", {})
                     for e in c.get("env", []))
        secrets = [s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s]
        rendered = [_named(objs, "Secret", s) for s in secrets]
        has_key = any(s and model.api_key_env in {**s.get("data", {}), **s.get("stringData", {})}
                      for s in rendered)
        out_of_band = secrets and not any(rendered)
        if not (direct or has_key or out_of_band):
            problems.append(f"model {model.name}: {model.api_key_env} does not come from a "
                            "Secret in the llm_engine container")
    return problems


def check_scaling(objs: list[Obj]) -> Problems:
    problems = []
    hpas = _by_kind(objs, "HorizontalPodAutoscaler")
    pdbs = _by_kind(objs, "PodDisruptionBudget")
    for module, (dep, _) in app_deployments(objs).items():
        name = dep["metadata"]["name"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        hpa = [h for h in hpas if h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
               and h["spec"]["scaleTargetRef"]["name"] == name]
        if len(hpa) != 1 or hpa[0]["apiVersion"] != "autoscaling/v2":
            problems.append(f"Deployment/{name}: needs exactly one autoscaling/v2 HPA")
        elif not 1 <= hpa[0]["spec"].get("minReplicas", 1) <= hpa[0]["spec"]["maxReplicas"]:
            problems.append(f"HPA/{name}: bad bounds")
        elif "replicas" in dep["spec"]:
            problems.append(f"Deployment/{name}: `replicas` fights the HPA on every apply")
        if not any(_selects(p["spec"]["selector"].get("matchLabels", {}), labels) for p in pdbs):
            problems.append(f"Deployment/{name}: no PodDisruptionBudget ({module})")
    return problems


def check_references(objs: list[Obj], out_of_band: set[str]) -> Problems:
    problems = []
    for obj in objs:
        spec = _pod_spec(obj)
        if spec is None:
            continue
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        wanted = []
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                wanted.append(("ConfigMap", vol["configMap"]["name"]))
            if "secret" in vol:
                wanted.append(("Secret", vol["secret"]["secretName"]))
        for c in _containers(obj):
            for src in c.get("envFrom", []):
                for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if field in src:
                        wanted.append((kind, src[field]["name"]))
            for var in c.get("env", []):
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field in var.get("valueFrom", {}):
                        wanted.append((kind, var["valueFrom"][field]["name"]))
            claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in {v["name"] for v in spec.get("volumes", [])} | claims:
                    problems.append(f"{where}: mounts unknown volume {mount['name']}")
        for kind, name in wanted:
            if _named(objs, kind, name) is None and not (kind == "Secret" and name in out_of_band):
                problems.append(f"{where}: {kind} {name} is not rendered")
        if obj["kind"] == "StatefulSet":
            svc = _named(objs, "Service", obj["spec"].get("serviceName", ""))
            if svc is None or svc["spec"].get("clusterIP") != "None":
                problems.append(f"{where}: serviceName must be a rendered headless Service")
    for svc in _by_kind(objs, "Service"):
        sel = svc["spec"].get("selector", {})
        if not any(_selects(sel, o["spec"]["template"]["metadata"]["labels"])
                   for o in objs if _pod_spec(o) is not None):
            problems.append(f"Service/{svc['metadata']['name']} selects no pods")
    return problems


def check_dockerfile(text: str) -> Problems:
    problems = []
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    images = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), f.split()[1])
              for f in froms]
    if len(froms) < 2:
        problems.append("the Dockerfile must be multi-stage (build, then a slim runtime)")
    if not images or not all(img.startswith("python:3.11-slim") for img in images):
        problems.append(f"stages must build FROM python:3.11-slim, got {images}")
    body = " ".join(lines)
    if "grpc_tools.protoc" not in body or "--grpc_python_out=." not in body or \
            "protos/promptline/v1/*.proto" not in body or "touch promptline/v1/__init__.py" \
            not in body:
        problems.append("the image must generate promptline/v1 from protos/ (as `make protos`)")
    protoc_at = body.find("grpc_tools.protoc")
    install_at = body.find('pip install ".[server]"', max(protoc_at, 0))
    if protoc_at < 0 or install_at < 0:
        problems.append('`pip install ".[server]"` (the services\' extra) must run after the '
                        "protobuf code is generated")
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] != str(APP_UID):
        problems.append(f"the last USER must be the numeric uid {APP_UID} (runAsNonRoot "
                        "can only verify a numeric user)")
    entry = [ln for ln in lines if ln.upper().startswith("ENTRYPOINT ")]
    try:
        entrypoint = json.loads(entry[-1].split(None, 1)[1]) if entry else None
    except json.JSONDecodeError:
        entrypoint = None  # shell form
    if entrypoint != ["python", "-m"]:
        problems.append('ENTRYPOINT must be ["python", "-m"] (exec form, no shell)')
    if "PYTHONDONTWRITEBYTECODE=1" not in body:
        problems.append("the read-only root FS needs PYTHONDONTWRITEBYTECODE=1")
    return problems


# ==============================================================================================
# Tests

RENDERS = list(KUSTOMIZATIONS)
OVERLAYS = ["local", "prod"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Config, Obj]]:
    out = {}
    for name in RENDERS:
        config, raw, problems = mounted_config(render(name), tmp_path_factory.mktemp(name))
        assert not problems, problems
        out[name] = (config, raw)
    return out


@pytest.mark.parametrize("name", RENDERS)
def test_every_object_matches_the_kubernetes_schema(name: str) -> None:
    objs = render(name)
    assert objs
    assert not check_schemas(objs)


def test_schema_version_is_pinned_and_shipped() -> None:
    assert kv.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
                       K8S_VERSION, strict=True) == "1.30"


@pytest.mark.parametrize("name", RENDERS)
def test_containers_are_hardened_and_bounded(name: str) -> None:
    assert not check_hardening(render(name))


@pytest.mark.parametrize("name", RENDERS)
def test_probes(name: str, loaded: dict[str, tuple[Config, Obj]]) -> None:
    assert not check_probes(render(name), loaded[name][0])


@pytest.mark.parametrize("name", RENDERS)
def test_termination_grace_outlasts_the_drain(name: str,
                                               loaded: dict[str, tuple[Config, Obj]]) -> None:
    assert not check_termination(render(name), loaded[name][0])


@pytest.mark.parametrize("name", RENDERS)
def test_ingress_sse_settings_match_the_config(name: str,
                                               loaded: dict[str, tuple[Config, Obj]]) -> None:
    assert not check_ingress(render(name), loaded[name][0])


@pytest.mark.parametrize("name", RENDERS)
def test_configmap_config_matches_services(name: str,
                                           loaded: dict[str, tuple[Config, Obj]]) -> None:
    config, raw = loaded[name]
    assert not check_config(render(name), config, raw, expect_redis=name in OVERLAYS)


@pytest.mark.parametrize("name", RENDERS)
def test_hpa_and_pdb_cover_every_service(name: str) -> None:
    assert not check_scaling(render(name))


@pytest.mark.parametrize("name", RENDERS)
def test_references_resolve(name: str) -> None:
    assert not check_references(render(name), OUT_OF_BAND_SECRETS.get(name, set()))


def test_local_overlay(loaded: dict[str, tuple[Config, Obj]]) -> None:
    objs = render("local")
    assert all(h["spec"]["minReplicas"] == 1 for h in _by_kind(objs, "HorizontalPodAutoscaler"))
    config, _ = loaded["local"]
    assert {m.provider for m in config.models} == {"simulated"}
    assert _by_kind(objs, "StatefulSet"), "the local overlay runs the in-cluster Redis"


@pytest.mark.parametrize("name", ["prod", *EXTERNAL_REDIS])
def test_prod_overlay(name: str, loaded: dict[str, tuple[Config, Obj]]) -> None:
    objs = render(name)
    hpas = _by_kind(objs, "HorizontalPodAutoscaler")
    assert hpas and all(h["spec"]["minReplicas"] >= 2 for h in hpas)
    ing = _by_kind(objs, "Ingress")[0]
    assert all(r.get("host") for r in ing["spec"]["rules"]) and ing["spec"].get("tls")
    # The placeholder provider-key Secret must never overwrite the real one.
    assert not _by_kind(objs, "Secret")
    for c in (c for o in objs for c in _containers(o) if _module(c)):
        assert not c["image"].endswith((":dev", ":latest")), c["image"]
    _, raw = loaded[name]
    digests = {str(k).removeprefix("sha256:").lower() for t in raw["tenants"]
               for k in t["api_keys"]}
    assert DEV_KEY_DIGEST not in digests, "the well-known dev-key must not open production"
    assert all(o["metadata"].get("namespace") == "promptline" for o in objs)


@pytest.mark.parametrize("name", RENDERS)
def test_config_as_each_pod_sees_it(name: str, loaded: dict[str, tuple[Config, Obj]]) -> None:
    """The mounted config with each service container's env overrides loads for real."""
    _, raw = loaded[name]
    for _, container in app_deployments(render(name)).values():
        parse_config(copy.deepcopy(raw), env=container_env(container))


def _redis_objects(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["metadata"].get("labels", {}).get(
        "app.kubernetes.io/name") == "redis"]


@pytest.mark.parametrize("name,mode", EXTERNAL_REDIS.items())
def test_external_redis_overlays(name: str, mode: str,
                                 loaded: dict[str, tuple[Config, Obj]]) -> None:
    objs = render(name)
    assert not _by_kind(objs, "StatefulSet") and not _redis_objects(objs), \
        "an external Redis replaces the in-cluster one"
    apps = app_deployments(objs)
    # The Redis clients: the prompt service, and the engine (the provider pools' shared state).
    clients = [apps[module][1] for module in REDIS_CLIENTS]
    for container in clients:
        env = {var["name"]: var for var in container["env"]}
        assert env["PROMPTLINE_REDIS_MODE"].get("value") == mode
        # The URL (and its password) comes from the out-of-band Secret, never from git.
        assert env["PROMPTLINE_REDIS_URL"].get("valueFrom") == {
            "secretKeyRef": {"name": "promptline-redis", "key": "PROMPTLINE_REDIS_URL"}}
    for module, (_, c) in apps.items():
        if module not in REDIS_CLIENTS:
            assert not [v for v in c.get("env", []) if "REDIS" in v["name"]], module
    configs = [parse_config(copy.deepcopy(loaded[name][1]), env=container_env(c))
               for c in clients]
    assert configs[0] == configs[1], "the prompt and engine pods must reach the same Redis"
    config = configs[0]
    assert config.redis_mode == mode
    assert config.redis_url == SECRET_SAMPLES["promptline-redis", "PROMPTLINE_REDIS_URL"]
    if mode == "sentinel":
        assert config.redis_sentinel.master and len(config.redis_sentinel.nodes) >= 3
        assert all(n.endswith(":26379") for n in config.redis_sentinel.nodes)
    # Everything else is prod's, unchanged (the same config, hence the same ConfigMap name).
    prod = render("prod")
    prod = [o for o in prod if o not in _redis_objects(prod)]
    for container in clients:
        container["env"] = [v for v in container["env"]
                            if not v["name"].startswith("PROMPTLINE_REDIS_")]
    assert objs == prod


def test_dockerfile() -> None:
    assert not check_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


def test_dockerignore_keeps_generated_and_local_state_out() -> None:
    ignored = {ln.strip().rstrip("/") for ln in
               (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    assert {".git", ".venv", "promptline/v1"} <= ignored


def _package_data_covers(file: Path, package_data: dict[str, list[str]]) -> bool:
    for package, patterns in package_data.items():
        bases = ([file.parent, *file.parents] if package == "*"
                 else [ROOT / package.replace(".", "/")])
        for base in bases:
            if base != ROOT and base in file.parents and any(
                    fnmatch.fnmatch(file.relative_to(base).as_posix(), pat) for pat in patterns):
                return True
    return False


def test_image_ships_every_package_file() -> None:
    """The image runs what `pip install .` installs, and setuptools installs only Python files
    unless package data is declared: a page or template under promptline/ or services/ that
    pyproject.toml does not declare is missing from the image (the Dockerfile's build check
    fails the same way)."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8")).get(
        "tool", {}).get("setuptools", {}).get("package-data", {})
    missing = [p.relative_to(ROOT).as_posix() for d in ("promptline", "services")
               for p in sorted((ROOT / d).rglob("*"))
               if p.is_file() and p.suffix not in (".py", ".pyc", ".pyi")
               and "__pycache__" not in p.parts and not p.is_relative_to(ROOT / "promptline/v1")
               and not _package_data_covers(p, package_data)]
    assert not missing, (f"not installed by `pip install .`, so not in the image: {missing}; "
                         "declare them in [tool.setuptools.package-data] of pyproject.toml")


# --- every check can fail ----------------------------------------------------------------------


def _first(objs: list[Obj], kind: str, name: str) -> Obj:
    obj = _named(objs, kind, name)
    assert obj is not None
    return obj


def _edge_container(objs: list[Obj]) -> Obj:
    return app_deployments(objs)["services.edge_http"][1]


def _engine_container(objs: list[Obj]) -> Obj:
    return app_deployments(objs)["services.llm_engine"][1]


def _with_config(objs: list[Obj], **edits: Any) -> tuple[Config, Obj]:
    """The prod config with `edits` applied to the raw YAML mapping, reloaded for real."""
    cm = _by_kind(objs, "ConfigMap")[0]
    raw = yaml.safe_load(cm["data"]["promptline.yaml"])
    for dotted, value in edits.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_config(copy.deepcopy(raw), env={}), raw


MUTATIONS: list[tuple[str, Callable[[list[Obj]], Problems]]] = [
    ("schema: typo in a field", lambda o: (
        _edge_container(o).__setitem__("imagePullPolicyy", "Always"), check_schemas(o))[1]),
    ("schema: unknown kind", lambda o: check_schemas(
        [*o, {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}])),
    ("hardening: writable root FS", lambda o: (
        _edge_container(o)["securityContext"].__setitem__("readOnlyRootFilesystem", False),
        check_hardening(o))[1]),
    ("hardening: no memory limit", lambda o: (
        _engine_container(o)["resources"]["limits"].pop("memory"), check_hardening(o))[1]),
    ("hardening: root", lambda o: (
        _containers(_first(o, "StatefulSet", "redis"))[0]["securityContext"].__setitem__(
            "runAsNonRoot", False), check_hardening(o))[1]),
    ("hardening: capability added", lambda o: (
        _edge_container(o)["securityContext"]["capabilities"].__setitem__("add", ["NET_ADMIN"]),
        check_hardening(o))[1]),
    ("probes: httpGet instead of grpc", lambda o: (
        _engine_container(o).__setitem__("readinessProbe", {"tcpSocket": {"port": 50052}}),
        check_probes(o, _with_config(o)[0]))[1]),
    ("probes: wrong health service", lambda o: (
        _engine_container(o)["readinessProbe"]["grpc"].__setitem__("service", "x.Y"),
        check_probes(o, _with_config(o)[0]))[1]),
    ("probes: config listens elsewhere", lambda o: check_probes(
        o, _with_config(o, listen__prompt="0.0.0.0:6000")[0])),
    ("termination: grace too short", lambda o: check_termination(
        o, _with_config(o, shutdown_grace="2m")[0])),
    ("termination: shell preStop", lambda o: (
        _edge_container(o)["lifecycle"]["preStop"]["exec"].__setitem__(
            "command", ["sh", "-c", "sleep 5"]), check_termination(o, _with_config(o)[0]))[1]),
    ("ingress: request_timeout above read timeout", lambda o: check_ingress(
        o, _with_config(o, edge__request_timeout="15m")[0])),
    ("ingress: heartbeat above read timeout", lambda o: check_ingress(
        o, _with_config(o, edge__heartbeat="20m", edge__request_timeout="30m")[0])),
    ("ingress: buffering on", lambda o: (
        _by_kind(o, "Ingress")[0]["metadata"]["annotations"].__setitem__(
            "nginx.ingress.kubernetes.io/proxy-buffering", "on"),
        check_ingress(o, _with_config(o)[0]))[1]),
    ("ingress: body limit below the edge's", lambda o: check_ingress(
        o, _with_config(o, edge__max_body_bytes=8 << 20)[0])),
    ("config: target names no Service", lambda o: check_config(
        o, *_with_config(o, targets__prompt="prompt-svc:50051"), expect_redis=True)),
    ("config: target on the wrong port", lambda o: check_config(
        o, *_with_config(o, targets__llm_engine="llm-engine:50051"), expect_redis=True)),
    ("config: redis_url names no Redis", lambda o: check_config(
        o, *_with_config(o, redis_url="redis://cache:6379/0"), expect_redis=True)),
    ("config: plain tenant key", lambda o: check_config(
        o, *_with_config(o, tenants=[{"name": "t", "api_keys": ["plain-key"]}]),
        expect_redis=True)),
    ("config: provider key not from a Secret", lambda o: (
        _engine_container(o).pop("envFrom"),
        check_config(o, *_with_config(o), expect_redis=True))[1]),
    ("scaling: replicas beside an HPA", lambda o: (
        _first(o, "Deployment", "prompt")["spec"].__setitem__("replicas", 3),
        check_scaling(o))[1]),
    ("scaling: no PDB", lambda o: check_scaling(
        [x for x in o if not (x["kind"] == "PodDisruptionBudget"
                              and x["metadata"]["name"] == "llm-engine")])),
    ("references: missing ConfigMap", lambda o: check_references(
        [x for x in o if x["kind"] != "ConfigMap"], set())),
    ("references: env from a missing Secret", lambda o: (
        _edge_container(o)["env"].append(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "nowhere", "key": "x"}}}),
        check_references(o, set()))[1]),
    ("config: local quota share for too few replicas", lambda o: check_config(
        o, *_with_config(o, quota_policy={"on_redis_error": "local", "replicas": 1}),
        expect_redis=True)),
    ("references: redis Service not headless", lambda o: (
        _first(o, "Service", "redis")["spec"].pop("clusterIP"), check_references(o, set()))[1]),
]


@pytest.mark.parametrize("label,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_checks_catch_breakage(label: str, mutate: Callable[[list[Obj]], Problems]) -> None:
    assert mutate(render("prod")), f"{label}: the check did not notice"


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("USER 10001:10001", "USER root"),
    lambda t: t.replace("touch promptline/v1/__init__.py", "true"),
    lambda t: t.replace('ENTRYPOINT ["python", "-m"]', "ENTRYPOINT python -m"),
    lambda t: t.replace("python:3.11-slim", "python:3.12"),
], ids=["root", "no-generated-package", "shell-entrypoint", "base-image"])
def test_dockerfile_check_catches_breakage(edit: Callable[[str], str]) -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert edit(text) != text
    assert check_dockerfile(edit(text))


@pytest.mark.parametrize("name", RENDERS)
def test_metrics_ports_are_scraped_where_the_services_listen(
        name: str, loaded: dict[str, tuple[Config, Obj]]) -> None:
    """Each gRPC service's `/metrics` listens on all interfaces, on the port its pod declares
    and annotates for Prometheus; the edge serves `/metrics` on its HTTP port."""
    config, _ = loaded[name]
    deployments = app_deployments(render(name))
    wanted = {"services.prompt": config.listen.prompt_metrics,
              "services.llm_engine": config.listen.llm_engine_metrics,
              "services.edge_http": config.listen.edge_http}
    for module, address in wanted.items():
        deployment, container = deployments[module]
        host, _, port = address.rpartition(":")
        assert host == "0.0.0.0", f"{module}: metrics on {address} cannot be scraped"
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", module
        assert annotations.get("prometheus.io/port") == port, module
        assert int(port) in {p["containerPort"] for p in container.get("ports", [])}, module
