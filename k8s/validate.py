#!/usr/bin/env python3
"""Static checks of meshgate's deployment files: k8s/*.yaml, consul/*.json, docker-compose.yml.

No cluster or Docker needed: the files are parsed (PyYAML, tomllib, json) and checked for
what would break a deployment or the demo:

- every manifest: known kind/apiVersion, metadata.name, labels;
- Deployment: 3 replicas, selector matches the pod labels, image and args, ports 8080/9901,
  readiness /ready and liveness /live on the admin port, terminationGracePeriodSeconds larger
  than drain_delay + grace_period (read from the ConfigMap, defaults 5s and 30s), no preStop
  needed, non-root security context, config volume from the ConfigMap;
- ConfigMap: gateway.toml parses; listen/admin ports match the container ports; admin on a
  non-loopback address (the kubelet probes the pod IP); --config points at the mounted file;
- Service and PodDisruptionBudget select the Deployment's pods; targetPort exists; the PDB
  allows a disruption with 3 replicas but never all;
- kustomization.yaml lists every manifest;
- consul/*.json: Consul service definitions with id/name/address/port, an HTTP check on
  /health, valid weights, meshgate.route tags;
- docker-compose.yml: env-only gateway with Consul discovery and routes from tags, and each
  Consul definition's address is a compose service running `mock-service PORT NAME` with the
  same port and name.

Prints one line per failed check and a summary line "deploy: N passed, M failed";
exit status 1 if any check failed.
"""

import glob
import json
import os
import re
import sys

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("k8s/validate.py needs PyYAML: python3 -m pip install pyyaml (k8s/check.sh does this)")

try:
    import tomllib
except ImportError:  # Python < 3.11
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "k8s")

API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "PodDisruptionBudget": "policy/v1",
    "Secret": "v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

passed = 0
failures = []


def check(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
    return bool(cond)


def duration_secs(text, default):
    """'5s', '500ms', '1m30s', '2m' -> seconds."""
    if text is None:
        return default
    if isinstance(text, (int, float)):
        return float(text)
    total, pos = 0.0, 0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"bad duration {text!r}")
    return total


def find_key(tree, key):
    """First value of `key` anywhere in a nested dict (drain_delay may live in a section)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = find_key(v, key)
            if found is not None:
                return found
    return None


def port_of(listen):
    host, _, port = str(listen).rpartition(":")
    return host.strip("[]"), int(port)


def load_manifests():
    docs = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml")) + glob.glob(os.path.join(K8S, "*.yml"))):
        name = os.path.basename(path)
        try:
            with open(path) as f:
                loaded = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            check(False, f"{name}: YAML does not parse: {e}")
            continue
        check(loaded, f"{name}: no YAML document")
        for d in loaded:
            docs.append((name, d))
    return docs


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_k8s():
    docs = load_manifests()
    by_kind = {}
    for name, d in docs:
        kind = d.get("kind")
        where = f"{name}: {kind}"
        check(isinstance(d, dict) and kind in API_VERSIONS, f"{name}: unknown or missing kind {kind!r}")
        check(d.get("apiVersion") == API_VERSIONS.get(kind),
              f"{where}: apiVersion {d.get('apiVersion')!r}, expected {API_VERSIONS.get(kind)!r}")
        if kind != "Kustomization":
            meta = d.get("metadata") or {}
            check(DNS1123.match(str(meta.get("name", ""))), f"{where}: metadata.name missing or not DNS-1123")
            check((meta.get("labels") or {}).get("app.kubernetes.io/name") == "meshgate",
                  f"{where}: label app.kubernetes.io/name=meshgate missing")
        by_kind.setdefault(kind, []).append((name, d))

    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Kustomization"):
        check(len(by_kind.get(kind, [])) == 1, f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
    if any(len(by_kind.get(k, [])) != 1 for k in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Kustomization")):
        return

    _, dep = by_kind["Deployment"][0]
    spec = dep.get("spec") or {}
    tmpl = spec.get("template") or {}
    pod_labels = (tmpl.get("metadata") or {}).get("labels") or {}
    pod = tmpl.get("spec") or {}
    check(spec.get("replicas") == 3, f"Deployment: replicas is {spec.get('replicas')}, expected 3")
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    check(labels_match(sel, pod_labels), "Deployment: selector.matchLabels does not match the pod template labels")
    containers = pod.get("containers") or []
    check(len(containers) == 1, "Deployment: expected one container")
    c = containers[0] if containers else {}
    check(c.get("name") and c.get("image"), "Deployment: container needs name and image")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    check(ports.get("http") == 8080, "Deployment: container port 'http' must be 8080")
    check(ports.get("admin") == 9901, "Deployment: container port 'admin' must be 9901")

    def probe_port(probe):
        port = ((probe or {}).get("httpGet") or {}).get("port")
        return ports.get(port) if isinstance(port, str) else port

    rp, lp = c.get("readinessProbe"), c.get("livenessProbe")
    check(rp and rp.get("httpGet", {}).get("path") == "/ready", "Deployment: readinessProbe must GET /ready")
    check(lp and lp.get("httpGet", {}).get("path") == "/live", "Deployment: livenessProbe must GET /live")
    check(probe_port(rp) == 9901, "Deployment: readinessProbe must use the admin port 9901")
    check(probe_port(lp) == 9901, "Deployment: livenessProbe must use the admin port 9901")
    if c.get("startupProbe"):
        check(probe_port(c["startupProbe"]) == 9901, "Deployment: startupProbe must use the admin port 9901")
    if rp:
        # the pod must look unready well within drain_delay
        detect = rp.get("periodSeconds", 10) * rp.get("failureThreshold", 3)
        check(detect <= 5, f"Deployment: readiness notices a failing /ready only after {detect}s (> drain_delay 5s)")
    check(not (c.get("lifecycle") or {}).get("preStop"),
          "Deployment: no preStop hook expected (meshgate waits drain_delay itself)")

    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, "Deployment: runAsNonRoot must be true")
    check(csc.get("allowPrivilegeEscalation") is False, "Deployment: allowPrivilegeEscalation must be false")
    check(csc.get("readOnlyRootFilesystem") is True, "Deployment: readOnlyRootFilesystem should be true")

    # ConfigMap, volume, args
    cm_name, cm = by_kind["ConfigMap"][0]
    cm_meta_name = (cm.get("metadata") or {}).get("name")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    cm_volumes = [n for n, v in volumes.items() if (v.get("configMap") or {}).get("name") == cm_meta_name]
    check(cm_volumes, f"Deployment: no volume from ConfigMap {cm_meta_name}")
    mounts = {m.get("name"): m.get("mountPath") for m in c.get("volumeMounts") or []}
    args = [str(a) for a in (c.get("args") or [])]
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    check(config_path, "Deployment: args must pass --config FILE")
    cfg = None
    data = cm.get("data") or {}
    for vol in cm_volumes:
        mount = mounts.get(vol)
        check(mount, f"Deployment: ConfigMap volume {vol} is not mounted")
        if mount and config_path:
            key = os.path.relpath(config_path, mount)
            check(key in data, f"Deployment: --config {config_path} is not a key of ConfigMap {cm_meta_name} mounted at {mount}")
            if key in data:
                if tomllib is None:
                    print("note: tomllib/tomli missing, gateway.toml not parsed", file=sys.stderr)
                else:
                    try:
                        cfg = tomllib.loads(data[key])
                        check(True, "")
                    except tomllib.TOMLDecodeError as e:
                        check(False, f"{cm_name}: {key} is not valid TOML: {e}")

    drain, grace = 5.0, 30.0
    if cfg is not None:
        host, port = port_of(cfg.get("listen", "0.0.0.0:8080"))
        check(port == ports.get("http"), f"ConfigMap: listen port {port} != container port http")
        check(host not in ("127.0.0.1", "localhost", "::1"), "ConfigMap: listen must not be loopback in a pod")
        ahost, aport = port_of((cfg.get("admin") or {}).get("listen", "127.0.0.1:9901"))
        check(aport == 9901, f"ConfigMap: admin listen port {aport} != 9901")
        check(ahost not in ("127.0.0.1", "localhost", "::1"),
              "ConfigMap: admin must listen on a non-loopback address, the kubelet probes the pod IP")
        try:
            drain = duration_secs(find_key(cfg, "drain_delay"), 5.0)
            grace = duration_secs(find_key(cfg, "grace_period"), 30.0)
        except ValueError as e:
            check(False, f"ConfigMap: {e}")
        for r in cfg.get("routes") or []:
            check(r.get("path", "").startswith("/"), f"ConfigMap: route {r.get('name')} needs a path starting with /")
            check(bool(r.get("service")) != bool(r.get("targets")),
                  f"ConfigMap: route {r.get('name')} needs exactly one of service / targets")
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    check(tgps > drain + grace,
          f"Deployment: terminationGracePeriodSeconds {tgps} must exceed drain_delay + grace_period = {drain + grace:g}")

    env = {e.get("name"): e for e in c.get("env") or []}
    check("MESHGATE_ADMIN_TOKEN" in env, "Deployment: MESHGATE_ADMIN_TOKEN must be set (admin is not loopback)")

    # Service
    _, svc = by_kind["Service"][0]
    sspec = svc.get("spec") or {}
    check(labels_match(sspec.get("selector") or {}, pod_labels), "Service: selector does not match the pod labels")
    for p in sspec.get("ports") or []:
        tp = p.get("targetPort", p.get("port"))
        check((tp in ports) if isinstance(tp, str) else (tp in ports.values()),
              f"Service: targetPort {tp!r} is not a container port")
        check(tp not in ("admin", 9901), "Service: the admin port should not be exposed")

    # PodDisruptionBudget
    _, pdb = by_kind["PodDisruptionBudget"][0]
    pspec = pdb.get("spec") or {}
    check(labels_match((pspec.get("selector") or {}).get("matchLabels") or {}, pod_labels),
          "PodDisruptionBudget: selector does not match the pod labels")
    has_min, has_max = "minAvailable" in pspec, "maxUnavailable" in pspec
    check(has_min != has_max, "PodDisruptionBudget: set exactly one of minAvailable / maxUnavailable")
    replicas = spec.get("replicas") or 1
    if has_max and isinstance(pspec["maxUnavailable"], int):
        check(1 <= pspec["maxUnavailable"] < replicas, "PodDisruptionBudget: maxUnavailable must be 1..replicas-1")
    if has_min and isinstance(pspec["minAvailable"], int):
        check(1 <= pspec["minAvailable"] < replicas, "PodDisruptionBudget: minAvailable must be 1..replicas-1")

    # Kustomization
    _, kz = by_kind["Kustomization"][0]
    listed = set(kz.get("resources") or [])
    manifests = {n for n, d in docs if d.get("kind") != "Kustomization"}
    check(listed == manifests, f"kustomization.yaml: resources {sorted(listed)} != manifests {sorted(manifests)}")


def check_consul():
    defs = {}
    files = sorted(glob.glob(os.path.join(ROOT, "consul", "*.json")))
    check(files, "consul/: no service definitions")
    for path in files:
        name = "consul/" + os.path.basename(path)
        try:
            with open(path) as f:
                doc = json.load(f)
        except ValueError as e:
            check(False, f"{name}: invalid JSON: {e}")
            continue
        services = doc.get("services") or ([doc["service"]] if "service" in doc else [])
        check(services, f"{name}: no 'service' or 'services'")
        for s in services:
            sid = s.get("id") or s.get("name")
            where = f"{name}: {sid}"
            check(sid not in defs, f"{where}: duplicate service id")
            defs[sid] = s
            check(s.get("name") and s.get("address") and isinstance(s.get("port"), int),
                  f"{where}: needs name, address and an integer port")
            check(s.get("address") not in ("0.0.0.0", "::"), f"{where}: address may not be a wildcard")
            w = s.get("weights") or {}
            wl = {k.lower(): v for k, v in w.items()}
            check(not w or (isinstance(wl.get("passing"), int) and 1 <= wl["passing"] <= 65535
                            and isinstance(wl.get("warning", 1), int) and 0 <= wl.get("warning", 1) <= 65535),
                  f"{where}: weights need 1 <= passing <= 65535 and 0 <= warning <= 65535 (Consul's rule)")
            chk = s.get("check") or {}
            check(chk.get("http") == f"http://{s.get('address')}:{s.get('port')}/health",
                  f"{where}: check.http should be http://{s.get('address')}:{s.get('port')}/health")
            try:
                check(duration_secs(chk.get("interval"), 0) > 0 and duration_secs(chk.get("timeout"), 0) > 0,
                      f"{where}: check needs interval and timeout")
            except ValueError as e:
                check(False, f"{where}: {e}")
            tags = s.get("tags") or []
            route = [t for t in tags if t.startswith("meshgate.route=")]
            check(len(route) == 1 and route[0].split("=", 1)[1].startswith("/"),
                  f"{where}: needs one meshgate.route=/path tag")
    return defs


def check_compose(defs):
    path = os.path.join(ROOT, "docker-compose.yml")
    with open(path) as f:
        comp = yaml.safe_load(f)
    services = comp.get("services") or {}
    check("consul" in services and "gateway" in services, "docker-compose.yml: needs services consul and gateway")
    consul = services.get("consul") or {}
    check(str(consul.get("image", "")).startswith("hashicorp/consul"), "docker-compose.yml: consul must use hashicorp/consul")
    cmd = consul.get("command") or []
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    check("-dev" in cmd, "docker-compose.yml: consul must run in dev mode")
    config_dirs = [a.split("=", 1)[1] for a in cmd if a.startswith("-config-dir=")]
    mounted = {}
    for v in consul.get("volumes") or []:
        src, dst = (v.split(":")[:2] if isinstance(v, str) else (v.get("source"), v.get("target")))
        mounted[dst] = src
    check(any(os.path.normpath(mounted.get(d, "")) == "consul" for d in config_dirs),
          "docker-compose.yml: ./consul must be mounted at a -config-dir of the consul service")

    gw = services.get("gateway") or {}
    env = gw.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    gcmd = gw.get("command") or []
    gcmd = gcmd.split() if isinstance(gcmd, str) else gcmd
    check("--config" not in gcmd and not gw.get("volumes"),
          "docker-compose.yml: the gateway must be configured by environment only (no --config, no mounts)")
    check(env.get("MESHGATE_DISCOVERY__PROVIDER") == "consul", "docker-compose.yml: MESHGATE_DISCOVERY__PROVIDER=consul")
    check(str(env.get("MESHGATE_DISCOVERY__CONSUL__ROUTES_FROM_TAGS")).lower() == "true",
          "docker-compose.yml: MESHGATE_DISCOVERY__CONSUL__ROUTES_FROM_TAGS=true")
    check("consul" in str(env.get("CONSUL_HTTP_ADDR", env.get("MESHGATE_DISCOVERY__CONSUL__ADDRESS", ""))),
          "docker-compose.yml: the gateway must point at the consul service")
    admin = str(env.get("MESHGATE_ADMIN__LISTEN", "127.0.0.1:9901"))
    if not admin.startswith("127."):
        check(env.get("MESHGATE_ADMIN_TOKEN"), "docker-compose.yml: non-loopback admin needs MESHGATE_ADMIN_TOKEN")
    try:
        check(duration_secs(gw.get("stop_grace_period", "10s"), 10) > 35,
              "docker-compose.yml: gateway stop_grace_period must exceed drain_delay + grace_period (35s)")
    except ValueError as e:
        check(False, f"docker-compose.yml: {e}")

    for sid, s in defs.items():
        addr = s.get("address")
        svc = services.get(addr)
        if not check(svc is not None, f"consul {sid}: address {addr!r} is not a compose service"):
            continue
        ep = svc.get("entrypoint") or []
        ep = ep.split() if isinstance(ep, str) else ep
        sc = svc.get("command") or []
        sc = sc.split() if isinstance(sc, str) else sc
        argv = [str(a) for a in ep + sc]
        check(argv and argv[0].endswith("mock-service"), f"compose {addr}: should run mock-service")
        check(argv[1:3] == [str(s.get("port")), s.get("name")],
              f"compose {addr}: command {argv[1:3]} != [port, name] {[str(s.get('port')), s.get('name')]} of {sid}")


def main():
    check_k8s()
    defs = check_consul()
    check_compose(defs)
    for f in failures:
        print(f"FAIL {f}")
    print(f"deploy: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
