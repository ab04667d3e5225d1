#!/usr/bin/env python3
"""Checks the deployment manifests under deploy/ (run by crates/fulcrum/tests/integration/deploy.rs).

Usage: python3 tests/python/validate_manifests.py [REPO_ROOT]

- Every YAML document in deploy/kubernetes/ is validated, strictly (unknown fields refused),
  against the Kubernetes OpenAPI schemas that the `kubernetes-validate` package ships (no
  network), for each version in VERSIONS. The Kustomization is checked by hand: every resource
  it lists exists, and every manifest is listed or says why not.
- KEDA's ScaledObject and TriggerAuthentication (deploy/keda/) are custom resources, outside the
  core schemas: their structure is checked here (apiVersion, required fields, a metrics-api
  trigger with url, valueLocation and targetValue, metadata values as strings, the
  authentication it names).
- The pieces are checked against each other: names the Deployment, Service, RBAC and KEDA
  objects use exist; the Role grants exactly what discovery calls; the ScaledObject's URL
  names the Service's admin port, a host in `admin_hosts` and an autoscaled pool of the
  ConfigMap's fulcrum.toml, with the same replica bounds; the namespaces agree.

Exit status: 0 when everything holds, 1 when something does not (each problem on a line of its
own), 77 when `kubernetes-validate` or PyYAML is missing (the caller decides whether that is a
skip or a failure).
"""

import os
import sys
import tomllib
from urllib.parse import urlsplit

SKIP = 77
# The oldest Kubernetes the manifests claim (docs/deploy.md) and the newest one the package ships.
OLDEST = "1.30"


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, message):
        self.items.append(f"{where}: {message}")

    def check(self, condition, where, message):
        if not condition:
            self.add(where, message)
        return condition


def load_dir(yaml, directory):
    """(file, index, document) for every non-empty document of every YAML file in `directory`."""
    docs = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".yaml", ".yml")):
            continue
        path = os.path.join(directory, name)
        with open(path) as f:
            for i, doc in enumerate(yaml.safe_load_all(f)):
                if doc is not None:
                    docs.append((name, i, doc))
    return docs


def where(name, i, doc):
    kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    obj = meta.get("name", "?") if isinstance(meta, dict) else "?"
    return f"{name}#{i} {kind}/{obj}"


def dig(doc, *keys, default=None):
    for k in keys:
        if isinstance(doc, dict) and k in doc:
            doc = doc[k]
        elif isinstance(doc, list) and isinstance(k, int) and k < len(doc):
            doc = doc[k]
        else:
            return default
    return doc


def validate_schemas(kv, docs, versions, problems):
    n = 0
    for name, i, doc in docs:
        if doc.get("kind") == "Kustomization":
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
                n += 1
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.add(where(name, i, doc), f"Kubernetes {version}: {path}: {e.message}")
            except kv.SchemaNotFoundError as e:
                problems.add(where(name, i, doc), e.message)
    return n


def check_kustomization(directory, docs, problems):
    kustomizations = [(n, i, d) for n, i, d in docs if d.get("kind") == "Kustomization"]
    if not problems.check(len(kustomizations) == 1, "deploy/kubernetes", "expected one kustomization.yaml"):
        return None
    name, i, k = kustomizations[0]
    w = where(name, i, k)
    problems.check(k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", w, "apiVersion")
    resources = k.get("resources") or []
    for r in resources:
        problems.check(os.path.isfile(os.path.join(directory, r)), w, f"resource {r} does not exist")
    listed = set(resources)
    for f in sorted(os.listdir(directory)):
        if f.endswith((".yaml", ".yml")) and f != name and f not in listed:
            with open(os.path.join(directory, f)) as fh:
                head = " ".join(fh.read(2000).replace("#", " ").split()).lower()
            problems.check(
                "not in kustomization.yaml" in head,
                w,
                f"{f} is neither listed nor says why it is left out",
            )
    return k.get("namespace")


def objects(docs, kind):
    return {dig(d, "metadata", "name"): (n, i, d) for n, i, d in docs if d.get("kind") == kind}


def check_fulcrum(docs, problems):
    """The Deployment, its Service, ServiceAccount, RBAC and ConfigMap, against each other."""
    deployments = objects(docs, "Deployment")
    if not problems.check("fulcrum" in deployments, "deploy/kubernetes", "no Deployment named fulcrum"):
        return None
    name, i, dep = deployments["fulcrum"]
    w = where(name, i, dep)
    pod = dig(dep, "spec", "template", "spec", default={})
    containers = pod.get("containers") or []
    if not problems.check(len(containers) == 1, w, "expected one container"):
        return None
    c = containers[0]
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    problems.check({"http", "admin"} <= set(ports), w, f"container ports named http and admin, got {ports}")

    # Probes: the admin calls that need no token, on the admin port.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = dig(c, probe, "httpGet", default={})
        problems.check(get.get("path") == path and get.get("port") == "admin", w, f"{probe}: GET {path} on port admin")

    # Hardening.
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    problems.check(psc.get("runAsNonRoot") is True or sc.get("runAsNonRoot") is True, w, "runAsNonRoot")
    problems.check(sc.get("readOnlyRootFilesystem") is True, w, "readOnlyRootFilesystem")
    problems.check(sc.get("allowPrivilegeEscalation") is False, w, "allowPrivilegeEscalation: false")
    problems.check(dig(sc, "capabilities", "drop") == ["ALL"], w, "capabilities.drop [ALL]")
    problems.check(bool(dig(c, "resources", "requests")) and bool(dig(c, "resources", "limits")), w, "resources")

    # Names it refers to.
    accounts = objects(docs, "ServiceAccount")
    problems.check(pod.get("serviceAccountName") in accounts, w, "its serviceAccountName has no ServiceAccount here")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
    config_maps = objects(docs, "ConfigMap")
    config_volume = volumes.get("config", {})
    cm_name = dig(config_volume, "configMap", "name")
    problems.check(cm_name in config_maps, w, f"config volume names ConfigMap {cm_name!r}, not defined here")
    problems.check(mounts.get("config") == "/etc/fulcrum", w, "the ConfigMap is mounted at /etc/fulcrum (the image's -c)")
    token_secret = dig(volumes.get("admin-token", {}), "secret", "secretName")
    token_file = None
    for item in dig(volumes.get("admin-token", {}), "secret", "items", default=[]):
        token_file = os.path.join(mounts.get("admin-token", "?"), item.get("path", "?"))
    args = c.get("args") or []
    problems.check(
        token_file is not None and args[-2:] == ["--admin-token-file", token_file],
        w,
        f"--admin-token-file {token_file} (the Secret's mounted file) in args {args}",
    )

    # Drain: the grace period covers the preStop pause and the drain.
    toml_text = dig(config_maps.get(cm_name, (None, None, {}))[2], "data", "fulcrum.toml")
    if not problems.check(isinstance(toml_text, str), w, "ConfigMap has no fulcrum.toml"):
        return None
    config = tomllib.loads(toml_text)
    drain = str(dig(config, "proxy", "drain_timeout", default="30s"))
    drain_s = float(drain[:-1]) if drain.endswith("s") and not drain.endswith("ms") else 30.0
    pause = dig(c, "lifecycle", "preStop", "exec", "command", default=["sleep", "0"])
    pause_s = float(pause[-1]) if pause[0] == "sleep" else 0.0
    grace = pod.get("terminationGracePeriodSeconds", 30)
    problems.check(grace > drain_s + pause_s, w, f"terminationGracePeriodSeconds {grace} <= preStop {pause_s} + drain {drain_s}")

    # Service: targets the container's named ports, selects the pod.
    services = objects(docs, "Service")
    svc = services.get("fulcrum")
    if problems.check(svc is not None, "deploy/kubernetes", "no Service named fulcrum"):
        sname, si, s = svc
        sw = where(sname, si, s)
        labels = dig(dep, "spec", "template", "metadata", "labels", default={})
        selector = dig(s, "spec", "selector", default={})
        problems.check(selector and selector.items() <= labels.items(), sw, "selector does not select the pod")
        for p in dig(s, "spec", "ports", default=[]):
            problems.check(p.get("targetPort") in ports, sw, f"targetPort {p.get('targetPort')} is not a container port")

    # RBAC: exactly what discovery calls (list, then watch, EndpointSlices), nothing wider.
    roles = objects(docs, "Role")
    bindings = objects(docs, "RoleBinding")
    problems.check(not objects(docs, "ClusterRole") and not objects(docs, "ClusterRoleBinding"), "rbac", "nothing cluster-wide")
    for rname, (n, ri, role) in roles.items():
        for rule in role.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs"):
                problems.check("*" not in (rule.get(field) or []), where(n, ri, role), f"no wildcard in {field}")
    rules = dig(roles.get("fulcrum-discovery", (None, None, {}))[2], "rules", default=[])
    problems.check(
        rules == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}],
        "rbac.yaml",
        f"Role fulcrum-discovery grants list and watch on endpointslices only, got {rules}",
    )
    for bname, (n, bi, b) in bindings.items():
        bw = where(n, bi, b)
        problems.check(dig(b, "roleRef", "name") in roles, bw, "roleRef names no Role here")
        for s in b.get("subjects") or []:
            problems.check(s.get("kind") == "ServiceAccount" and s.get("name") in accounts, bw, f"subject {s}")
    actuator_rules = dig(roles.get("fulcrum-scale", (None, None, {}))[2], "rules", default=[])
    if actuator_rules:
        problems.check(
            actuator_rules[0].get("resources") == ["deployments/scale"]
            and actuator_rules[0].get("verbs") == ["get", "patch"],
            "rbac-kubernetes-actuator.yaml",
            "the Kubernetes actuator gets and patches deployments/scale, nothing more",
        )
    return {"config": config, "service": svc[2] if svc else {}, "token_secret": token_secret}


def check_keda(docs, fulcrum, namespace, problems):
    scaled = [(n, i, d) for n, i, d in docs if d.get("kind") == "ScaledObject"]
    auths = objects(docs, "TriggerAuthentication")
    problems.check(len(scaled) >= 1, "deploy/keda", "no ScaledObject")
    for n, i, d in docs:
        w = where(n, i, d)
        problems.check(d.get("apiVersion") == "keda.sh/v1alpha1", w, f"apiVersion {d.get('apiVersion')!r}")
        problems.check(d.get("kind") in ("ScaledObject", "TriggerAuthentication"), w, "kind")
        problems.check(isinstance(dig(d, "metadata", "name"), str), w, "metadata.name")
        if namespace:
            problems.check(dig(d, "metadata", "namespace") == namespace, w, f"namespace is not {namespace}")
    for name, (n, i, a) in auths.items():
        w = where(n, i, a)
        refs = dig(a, "spec", "secretTargetRef", default=[])
        problems.check(bool(refs), w, "spec.secretTargetRef")
        for r in refs:
            problems.check(all(isinstance(r.get(k), str) for k in ("parameter", "name", "key")), w, f"secretTargetRef {r}")
            if fulcrum:
                problems.check(r.get("name") == fulcrum["token_secret"], w, "the Secret fulcrum serve reads its token from")
    config = fulcrum["config"] if fulcrum else {}
    for n, i, so in scaled:
        w = where(n, i, so)
        spec = so.get("spec") or {}
        problems.check(isinstance(dig(spec, "scaleTargetRef", "name"), str), w, "spec.scaleTargetRef.name")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        problems.check(isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, w, "0 <= minReplicaCount <= maxReplicaCount")
        triggers = spec.get("triggers") or []
        problems.check(bool(triggers), w, "spec.triggers")
        for t in triggers:
            meta = t.get("metadata") or {}
            problems.check(t.get("type") == "metrics-api", w, f"trigger type {t.get('type')!r}")
            problems.check(all(isinstance(v, str) for v in meta.values()), w, "trigger metadata values are strings")
            for key in ("url", "valueLocation", "targetValue"):
                problems.check(key in meta, w, f"trigger metadata.{key}")
            problems.check(t.get("metricType", "AverageValue") == "AverageValue", w, "metricType AverageValue")
            try:
                problems.check(float(meta.get("targetValue", "x")) == 1.0, w, "targetValue 1: replicas = desired / 1")
            except ValueError:
                problems.add(w, "targetValue is not a number")
            problems.check(meta.get("valueLocation") == "desired_replicas", w, "valueLocation desired_replicas")
            if meta.get("authMode") == "bearer":
                ref = dig(t, "authenticationRef", "name")
                params = [r.get("parameter") for r in dig(auths.get(ref, (0, 0, {}))[2], "spec", "secretTargetRef", default=[])]
                problems.check("token" in params, w, f"authMode bearer needs TriggerAuthentication {ref} with parameter token")
            url = urlsplit(meta.get("url", ""))
            problems.check(url.scheme in ("http", "https") and url.hostname, w, f"url {meta.get('url')!r}")
            if not fulcrum or not url.hostname:
                continue
            hosts = dig(config, "proxy", "admin_hosts", default=[])
            problems.check(url.hostname in hosts, w, f"{url.hostname} is not in admin_hosts {hosts}: the admin API answers 403")
            service = dig(fulcrum["service"], "metadata", "name")
            problems.check(url.hostname.split(".")[0] == service, w, f"url host does not name the Service {service}")
            if namespace and "." in url.hostname:
                problems.check(url.hostname.split(".")[1] == namespace, w, f"url host is not in namespace {namespace}")
            svc_ports = [p.get("port") for p in dig(fulcrum["service"], "spec", "ports", default=[]) if p.get("name") == "admin"]
            problems.check(url.port in svc_ports, w, f"url port {url.port} is not the Service's admin port {svc_ports}")
            parts = url.path.split("/")
            if problems.check(len(parts) == 4 and parts[1] == "pools" and parts[3] == "scale", w, "url path /pools/{pool}/scale"):
                pool = dig(config, "pool", parts[2])
                if problems.check(pool is not None, w, f"pool {parts[2]} is not in fulcrum.toml"):
                    auto = pool.get("autoscale")
                    if problems.check(auto is not None, w, f"pool {parts[2]} has no [autoscale]"):
                        problems.check(dig(auto, "actuator", "kind") == "external", w, "the pool's actuator is external")
                        problems.check(
                            (auto.get("min_replicas", 1), auto.get("max_replicas", 10)) == (lo, hi),
                            w,
                            "minReplicaCount and maxReplicaCount are the pool's min_replicas and max_replicas",
                        )
                    disc = pool.get("discovery") or {}
                    if namespace and disc.get("kind") == "kubernetes":
                        problems.check(disc.get("namespace") == namespace, w, "the pool discovers in the same namespace")


def main(root):
    try:
        import yaml
        import kubernetes_validate as kv
    except ImportError as e:
        print(f"SKIP: {e}; pip install kubernetes-validate pyyaml", flush=True)
        return SKIP

    versions = [OLDEST, kv.latest_version()]
    problems = Problems()
    k8s_dir = os.path.join(root, "deploy", "kubernetes")
    keda_dir = os.path.join(root, "deploy", "keda")
    docs = load_dir(yaml, k8s_dir)
    for name, i, doc in docs:
        problems.check(isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, f"{name}#{i}", "not an object")
    docs = [d for d in docs if isinstance(d[2], dict)]
    n = validate_schemas(kv, docs, versions, problems)
    namespace = check_kustomization(k8s_dir, docs, problems)
    fulcrum = check_fulcrum(docs, problems)
    keda = load_dir(yaml, keda_dir)
    check_keda(keda, fulcrum, namespace, problems)

    for p in problems.items:
        print(f"FAIL {p}")
    for name, i, d in docs + keda:
        print(f"checked {where(name, i, d)}")
    print(f"{len(docs)} Kubernetes documents ({n} schema validations, Kubernetes {' and '.join(versions)}), "
          f"{len(keda)} KEDA documents, {len(problems.items)} problems")
    return 1 if problems.items else 0


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..")))
