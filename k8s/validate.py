#!/usr/bin/env python3
"""Static checks of meshgate's deployment files: k8s/, consul/, docker-compose.yml.

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
- base/kustomization.yaml lists every manifest in k8s/base/, k8s/kustomization.yaml is [base];
- consul/*.json: Consul service definitions with id/name/address/port, an HTTP check on
  /health, valid weights, meshgate.route tags;
- docker-compose.yml: env-only gateway with Consul discovery and routes from tags, and each
  Consul definition's address is a compose service running `mock-service PORT NAME` with the
  same port and name.
- the mesh example: k8s/mesh/gateway.toml (mesh routes, identity, registration, no Consul
  address); consul/mesh/ (Connect on, a sidecar_service per instance of every mesh route's
  service, `*` deny plus an allow for the gateway's identity in intentions/); the compose `mesh`
  profile (its own Consul, the gateway mounting gateway.toml, each app loopback-only with its
  port and name, a `-sidecar-for` proxy in its network namespace, no host port clashes, nothing
  outside the profile depending on it); k8s/mesh/ (inject annotations, Services and
  ServiceAccounts named after the Consul service, ports as in consul/mesh/, ServiceDefaults and
  ServiceIntentions allowing the gateway's identity, the gateway patch).

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
BASE = os.path.join(K8S, "base")
MESH = os.path.join(K8S, "mesh")

API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "PodDisruptionBudget": "policy/v1",
    "Secret": "v1",
    "ServiceAccount": "v1",
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


def load_manifests(folder=None):
    docs = []
    folder = folder or BASE
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml")) + glob.glob(os.path.join(folder, "*.yml"))):
        name = os.path.relpath(path, K8S)
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


def load_yaml(path, name, every=False):
    """One YAML file (all its documents with every=True); None after a recorded failure."""
    try:
        with open(path) as f:
            loaded = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:
        check(False, f"{name}: cannot read: {e}")
        return None
    except yaml.YAMLError as e:
        check(False, f"{name}: YAML does not parse: {e}")
        return None
    if not check(loaded, f"{name}: no YAML document"):
        return None
    return loaded if every else loaded[0]


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def component(d):
    return ((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")


def check_k8s():
    docs = load_manifests()
    by_kind = {}
    redis = {}
    for name, d in docs:
        kind = d.get("kind")
        where = f"{name}: {kind}"
        check(isinstance(d, dict) and kind in API_VERSIONS, f"{name}: unknown or missing kind {kind!r}")
        check(d.get("apiVersion") == API_VERSIONS.get(kind),
              f"{where}: apiVersion {d.get('apiVersion')!r}, expected {API_VERSIONS.get(kind)!r}")
        if component(d) == "redis":
            # Its own name label: the gateway's selectors (name=meshgate) must not match it.
            check(((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name") == "meshgate-redis",
                  f"{where}: Redis needs label app.kubernetes.io/name=meshgate-redis")
            redis[kind] = d
            continue
        if kind != "Kustomization":
            meta = d.get("metadata") or {}
            check(DNS1123.match(str(meta.get("name", ""))), f"{where}: metadata.name missing or not DNS-1123")
            check((meta.get("labels") or {}).get("app.kubernetes.io/name") == "meshgate",
                  f"{where}: label app.kubernetes.io/name=meshgate missing")
        by_kind.setdefault(kind, []).append((name, d))

    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Kustomization"):
        check(len(by_kind.get(kind, [])) == 1, f"expected exactly one {kind}, found {len(by_kind.get(kind, []))}")
    if any(len(by_kind.get(k, [])) != 1 for k in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Kustomization")):
        return None

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
        check_k8s_rate_limits(cfg, spec.get("replicas"), redis)
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
    listed = {"base/" + r for r in kz.get("resources") or []}
    manifests = {n for n, d in docs if d.get("kind") != "Kustomization"}
    check(listed == manifests, f"base/kustomization.yaml: resources {sorted(listed)} != manifests {sorted(manifests)}")
    top = load_yaml(os.path.join(K8S, "kustomization.yaml"), "kustomization.yaml")
    check(top and top.get("kind") == "Kustomization" and (top.get("resources") or []) == ["base"],
          "kustomization.yaml: must be a Kustomization of exactly [base] (kubectl apply -k k8s/)")
    return {"deployment": dep, "tgps": tgps}


def check_k8s_rate_limits(cfg, replicas, redis):
    """Global limits: `[redis] url` names the Redis Service of redis.yaml, and each limit's
    `replicas` (its local fallback divisor) is the Deployment's replicas."""
    limits = [r for r in cfg.get("routes") or [] if (r.get("rate_limit") or {}).get("scope") == "global"]
    url = str((cfg.get("redis") or {}).get("url", ""))
    check(not limits or url, "ConfigMap: global rate limits need [redis] url")
    if not url:
        return
    host = url.split("://", 1)[-1].split("@")[-1].split(":")[0].split("/")[0]
    svc, dep = redis.get("Service"), redis.get("Deployment")
    if check(svc is not None and dep is not None, "redis.yaml: a Redis Deployment and Service are needed"):
        check((svc.get("metadata") or {}).get("name") == host,
              f"ConfigMap: [redis] url host {host!r} is not the Redis Service's name")
        pod = ((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}
        check(labels_match((svc.get("spec") or {}).get("selector") or {}, pod.get("labels") or {}),
              "redis.yaml: the Service's selector does not match the Redis pods")
    for r in limits:
        check(r["rate_limit"].get("replicas", 1) == replicas,
              f"ConfigMap: route {r.get('name')}: rate_limit.replicas {r['rate_limit'].get('replicas', 1)}"
              f" != Deployment replicas {replicas}")


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

    check_compose_rate_limits(services, env)

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


def check_compose_rate_limits(services, env):
    """Global rate limits: every replica has the gateway's variables, Redis is a healthy
    dependency, and a limit's `replicas` (its local fallback divisor) matches the replicas."""
    replicas = [n for n in services if n == "gateway" or n.startswith("gateway-")]
    for name in replicas:
        other = services[name].get("environment") or {}
        check(other == env, f"docker-compose.yml: {name} must have the same environment as gateway")
    url = str(env.get("MESHGATE_REDIS__URL", ""))
    if not url:
        return
    host = url.split("://", 1)[-1].split("@")[-1].split(":")[0].split("/")[0]
    redis = services.get(host)
    if check(redis is not None, f"docker-compose.yml: MESHGATE_REDIS__URL names {host!r}, not a compose service"):
        check("healthcheck" in redis, f"docker-compose.yml: {host} needs a healthcheck")
        for name in replicas:
            deps = services[name].get("depends_on") or {}
            check(host in deps, f"docker-compose.yml: {name} must depend on {host}")
    if tomllib is None or "MESHGATE_ROUTES" not in env:
        return
    try:
        routes = tomllib.loads("routes = " + str(env["MESHGATE_ROUTES"]))["routes"]
    except tomllib.TOMLDecodeError as e:
        check(False, f"docker-compose.yml: MESHGATE_ROUTES does not parse: {e}")
        return
    limits = [r for r in routes if (r.get("rate_limit") or {}).get("scope") == "global"]
    check(limits, "docker-compose.yml: no route with a global rate limit in MESHGATE_ROUTES")
    for r in limits:
        check(r["rate_limit"].get("replicas", 1) == len(replicas),
              f"docker-compose.yml: route {r.get('name')}: rate_limit.replicas "
              f"{r['rate_limit'].get('replicas', 1)} != {len(replicas)} gateway replicas")


def argv_of(svc):
    """A compose service's entrypoint + command as a list of strings."""
    out = []
    for key in ("entrypoint", "command"):
        v = svc.get(key) or []
        out += v.split() if isinstance(v, str) else [str(a) for a in v]
    return out


def env_of(svc):
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env if "=" in e)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def mounts_of(svc):
    """target -> source of a compose service's volumes."""
    out = {}
    for v in svc.get("volumes") or []:
        src, dst = (v.split(":")[:2] if isinstance(v, str) else (v.get("source"), v.get("target")))
        out[dst] = os.path.normpath(src)
    return out


def mesh_gateway_config():
    """k8s/mesh/gateway.toml: (config, identity, {mesh service: [route names]})."""
    path = os.path.join(MESH, "gateway.toml")
    if tomllib is None:
        print("note: tomllib/tomli missing, k8s/mesh/gateway.toml not parsed", file=sys.stderr)
        return None, "meshgate", {}
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        check(False, f"mesh/gateway.toml: {e}")
        return None, "meshgate", {}
    consul = (cfg.get("discovery") or {}).get("consul") or {}
    connect = consul.get("connect") or {}
    identity = connect.get("service", "meshgate")
    default_connect = connect.get("enabled", False)
    mesh = {}
    for r in cfg.get("routes") or []:
        if r.get("service") and r.get("connect", default_connect):
            mesh.setdefault(r["service"], []).append(r.get("name"))
    check(mesh, "mesh/gateway.toml: no route reaches a service through the mesh (connect = true)")
    check((cfg.get("discovery") or {}).get("provider") == "consul", "mesh/gateway.toml: discovery.provider must be consul")
    check("address" not in consul,
          "mesh/gateway.toml: no discovery.consul.address (it would win over CONSUL_HTTP_ADDR, set per environment)")
    reg = consul.get("register")
    if check(isinstance(reg, dict), "mesh/gateway.toml: [discovery.consul.register] missing (the gateway registers itself)"):
        check(reg.get("name", "meshgate") == identity,
              f"mesh/gateway.toml: register.name {reg.get('name')!r} != the mesh identity {identity!r}")
    _, port = port_of(cfg.get("listen", "0.0.0.0:8080"))
    check(port == 8080, f"mesh/gateway.toml: listen port {port} != 8080")
    ahost, aport = port_of((cfg.get("admin") or {}).get("listen", "127.0.0.1:9901"))
    check(aport == 9901 and ahost not in ("127.0.0.1", "localhost", "::1"),
          "mesh/gateway.toml: admin must listen on a non-loopback :9901 (probes, Consul's check on /ready)")
    return cfg, identity, mesh


def intention_allows(sources, identity):
    """Whether a list of intention sources (any key case) has an L4 allow for identity."""
    for src in sources or []:
        low = {k.lower(): v for k, v in src.items()}
        if low.get("name") == identity and str(low.get("action", "")).lower() == "allow":
            return True
    return False


def check_mesh_consul(identity, mesh):
    """consul/mesh/: Connect on, sidecar definitions, intention files. Returns {id: definition}."""
    folder = os.path.join(ROOT, "consul", "mesh")
    defs = {}
    connect_on = False
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.relpath(path, ROOT)
        try:
            with open(path) as f:
                doc = json.load(f)
        except ValueError as e:
            check(False, f"{name}: invalid JSON: {e}")
            continue
        if (doc.get("connect") or {}).get("enabled") is True:
            connect_on = True
        for s in doc.get("services") or ([doc["service"]] if "service" in doc else []):
            sid = s.get("id") or s.get("name")
            where = f"{name}: {sid}"
            check(sid not in defs, f"{where}: duplicate service id")
            defs[sid] = s
            check(s.get("name") and s.get("address") and isinstance(s.get("port"), int),
                  f"{where}: needs name, address and an integer port")
            side = (s.get("connect") or {}).get("sidecar_service")
            if not check(isinstance(side, dict), f"{where}: needs connect.sidecar_service"):
                continue
            check(isinstance(side.get("port"), int) and side.get("port") != s.get("port"),
                  f"{where}: sidecar_service needs its own integer port")
            proxy = side.get("proxy") or {}
            check(proxy.get("local_service_port", s.get("port")) == s.get("port"),
                  f"{where}: sidecar local_service_port {proxy.get('local_service_port')} != service port {s.get('port')}")
            check(proxy.get("local_service_address", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"),
                  f"{where}: the sidecar must reach the app on loopback")
            # A sidecar without tags inherits the service's; a meshgate.route tag there would
            # turn the proxy into a second tag route (CONNECT.md, traefik#8293).
            side_tags = side.get("tags", s.get("tags") or [])
            check(not any(t.startswith("meshgate.") or t.startswith("urlprefix-") for t in side_tags),
                  f"{where}: the sidecar must not carry meshgate.*/urlprefix- route tags")
    check(connect_on, "consul/mesh/: no agent config with connect.enabled = true")
    for svc in mesh:
        check(any(s.get("name") == svc for s in defs.values()),
              f"consul/mesh/: mesh route service {svc!r} has no instance with a sidecar definition")

    entries = {}
    for path in sorted(glob.glob(os.path.join(folder, "intentions", "*.json"))):
        name = os.path.relpath(path, ROOT)
        try:
            with open(path) as f:
                e = json.load(f)
        except ValueError as err:
            check(False, f"{name}: invalid JSON: {err}")
            continue
        low = {k.lower(): v for k, v in e.items()}
        check(low.get("kind") == "service-intentions", f"{name}: Kind must be service-intentions")
        check(low.get("name") not in entries, f"{name}: second entry for destination {low.get('name')!r}")
        entries[low.get("name")] = low.get("sources") or []
    wildcard = entries.get("*") or []
    check(any({k.lower(): v for k, v in src.items()}.get("name") == "*"
              and str({k.lower(): v for k, v in src.items()}.get("action")).lower() == "deny" for src in wildcard),
          "consul/mesh/intentions/: needs the default `*` -> `*` deny entry")
    for svc in mesh:
        check(intention_allows(entries.get(svc), identity),
              f"consul/mesh/intentions/: no intention allows {identity!r} to call {svc!r}")
    return defs


def check_mesh_compose(cfg, identity, mesh, defs):
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        services = (yaml.safe_load(f) or {}).get("services") or {}
    in_mesh = {n: s for n, s in services.items() if "mesh" in (s.get("profiles") or [])}
    check(in_mesh, "docker-compose.yml: no service in the `mesh` profile")
    # Plain `docker compose up` must not change: nothing outside the profile may use mesh parts.
    for n, s in services.items():
        if n in in_mesh:
            continue
        deps = s.get("depends_on") or []
        check(not any(d in in_mesh for d in deps), f"docker-compose.yml: {n} (no profile) depends on a mesh service")
        check("service:" not in str(s.get("network_mode", "")) or s["network_mode"][8:] not in in_mesh,
              f"docker-compose.yml: {n} (no profile) shares a mesh service's network")
    # Both stacks run together under --profile mesh: host ports must not clash.
    seen = {}
    for n, s in services.items():
        for p in s.get("ports") or []:
            host = ":".join(str(p).split(":")[:-1])
            check(host not in seen, f"docker-compose.yml: host port {host} of {n} already published by {seen.get(host)}")
            seen[host] = n

    consuls = [n for n, s in in_mesh.items() if str(s.get("image", "")).startswith("hashicorp/consul")
               and "agent" in argv_of(s)]
    if not check(len(consuls) == 1, f"docker-compose.yml: expected one Consul agent in the mesh profile, found {consuls}"):
        return
    cname = consuls[0]
    cargs = argv_of(in_mesh[cname])
    check("-dev" in cargs, f"docker-compose.yml: {cname} must run in dev mode")
    dirs = [a.split("=", 1)[1] for a in cargs if a.startswith("-config-dir=")]
    cm = mounts_of(in_mesh[cname])
    check(any(cm.get(d) == os.path.join("consul", "mesh") for d in dirs),
          f"docker-compose.yml: ./consul/mesh must be mounted at a -config-dir of {cname}")

    gws = [n for n, s in in_mesh.items() if "run" in argv_of(s) and "--config" in argv_of(s)]
    if check(len(gws) == 1, f"docker-compose.yml: expected one meshgate `run --config` in the mesh profile, found {gws}"):
        gname, gw = gws[0], in_mesh[gws[0]]
        args = argv_of(gw)
        cfg_path = args[args.index("--config") + 1] if args.index("--config") + 1 < len(args) else ""
        check(mounts_of(gw).get(cfg_path) == os.path.join("k8s", "mesh", "gateway.toml"),
              f"docker-compose.yml: {gname} must mount ./k8s/mesh/gateway.toml at --config {cfg_path}")
        env = env_of(gw)
        check(cname in env.get("CONSUL_HTTP_ADDR", ""), f"docker-compose.yml: {gname} CONSUL_HTTP_ADDR must point at {cname}")
        check(env.get("MESHGATE_DISCOVERY__CONSUL__REGISTER__ADDRESS") == gname,
              f"docker-compose.yml: {gname} must advertise itself as {gname} (MESHGATE_DISCOVERY__CONSUL__REGISTER__ADDRESS)")
        check(env.get("MESHGATE_ADMIN_TOKEN"), f"docker-compose.yml: {gname} needs MESHGATE_ADMIN_TOKEN (admin is not loopback)")
        check(not any(k.startswith("MESHGATE_DISCOVERY__CONSUL__CONNECT__SERVICE") and v != identity for k, v in env.items()),
              f"docker-compose.yml: {gname} overrides the mesh identity away from {identity!r}")
        try:
            check(duration_secs(gw.get("stop_grace_period", "10s"), 10) > 35,
                  f"docker-compose.yml: {gname} stop_grace_period must exceed drain_delay + grace_period (35s)")
        except ValueError as e:
            check(False, f"docker-compose.yml: {e}")

    writers = [n for n, s in in_mesh.items() if "config write" in " ".join(argv_of(s))]
    if check(writers, "docker-compose.yml: no service writes the intentions (consul config write)"):
        w = in_mesh[writers[0]]
        check("/consul/mesh/intentions/" in " ".join(argv_of(w)) and any(
                  src == os.path.join("consul", "mesh") for src in mounts_of(w).values()),
              f"docker-compose.yml: {writers[0]} must write ./consul/mesh/intentions/*.json")
        check(cname in env_of(w).get("CONSUL_HTTP_ADDR", ""), f"docker-compose.yml: {writers[0]} must talk to {cname}")

    sidecars = {}
    for n, s in in_mesh.items():
        a = argv_of(s)
        if "-sidecar-for" in a[:-1]:
            sidecars[a[a.index("-sidecar-for") + 1]] = (n, s)
    by_addr = {}
    for sid, d in defs.items():
        addr = d.get("address")
        app = in_mesh.get(addr)
        if not check(app is not None, f"consul/mesh {sid}: address {addr!r} is not a compose service in the mesh profile"):
            continue
        check(addr not in by_addr, f"consul/mesh {sid}: address {addr} already used by {by_addr.get(addr)}")
        by_addr[addr] = sid
        argv = argv_of(app)
        check(argv and argv[0].endswith("mock-service") and argv[1:3] == [str(d.get("port")), d.get("name")],
              f"compose {addr}: command {argv[1:3]} != [port, name] {[str(d.get('port')), d.get('name')]} of {sid}")
        check(env_of(app).get("MOCK_BIND") == "127.0.0.1",
              f"compose {addr}: MOCK_BIND=127.0.0.1, so only the sidecar reaches the app")
        side = sidecars.get(sid)
        if not check(side, f"compose: no `consul connect proxy -sidecar-for {sid}` service"):
            continue
        sname, s = side
        check(s.get("network_mode") == f"service:{addr}",
              f"compose {sname}: network_mode must be service:{addr} (the sidecar reaches the app on loopback)")
        check(cname in env_of(s).get("CONSUL_HTTP_ADDR", ""), f"compose {sname}: CONSUL_HTTP_ADDR must point at {cname}")
    for sid in sidecars:
        check(sid in defs, f"compose: sidecar for {sid!r}, which consul/mesh/ does not define")


def check_mesh_k8s(identity, mesh, defs, base):
    kz = load_yaml(os.path.join(MESH, "kustomization.yaml"), "mesh/kustomization.yaml")
    if not kz:
        return
    resources = kz.get("resources") or []
    check("../base" in resources, "mesh/kustomization.yaml: must build on ../base")
    docs = []
    for r in resources:
        if r.startswith(".."):
            continue
        loaded = load_yaml(os.path.join(MESH, r), f"mesh/{r}", every=True)
        docs += [(f"mesh/{r}", d) for d in loaded or []]
    gens = {g.get("name"): g for g in kz.get("configMapGenerator") or []}
    gen = gens.get("meshgate-config") or {}
    check(gen.get("behavior") == "replace" and "gateway.toml" in (gen.get("files") or []),
          "mesh/kustomization.yaml: configMapGenerator meshgate-config must replace the base's with gateway.toml")
    patches = [p.get("path") for p in kz.get("patches") or [] if p.get("path")]
    for p in patches:
        check(os.path.exists(os.path.join(MESH, p)), f"mesh/kustomization.yaml: patch {p} missing")
    patch = None
    for p in patches:
        d = load_yaml(os.path.join(MESH, p), f"mesh/{p}")
        if d and d.get("kind") == "Deployment" and (d.get("metadata") or {}).get("name") == "meshgate":
            patch = d
    if check(patch, "mesh/: no patch of the meshgate Deployment"):
        tmpl = (patch.get("spec") or {}).get("template") or {}
        ann = (tmpl.get("metadata") or {}).get("annotations") or {}
        check(ann.get("consul.hashicorp.com/connect-inject") == "false",
              "mesh/: the gateway pods must not be injected (connect-inject: \"false\"): meshgate speaks mTLS itself")
        env = {e.get("name") for c in (tmpl.get("spec") or {}).get("containers") or [] for e in c.get("env") or []}
        check("CONSUL_HTTP_ADDR" in env, "mesh/: the gateway patch must set CONSUL_HTTP_ADDR (no address in gateway.toml)")
        check("MESHGATE_DISCOVERY__CONSUL__REGISTER__ID" in env and "MESHGATE_DISCOVERY__CONSUL__REGISTER__ADDRESS" in env,
              "mesh/: each gateway pod needs its own registration ID and address")
    if base:
        cfg_drain = 35.0
        try:
            with open(os.path.join(MESH, "gateway.toml"), "rb") as f:
                c = tomllib.load(f) if tomllib else {}
            cfg_drain = duration_secs(find_key(c, "drain_delay"), 5.0) + duration_secs(find_key(c, "grace_period"), 30.0)
        except (OSError, ValueError, AttributeError):
            pass
        check(base["tgps"] > cfg_drain,
              f"mesh/: terminationGracePeriodSeconds {base['tgps']} must exceed drain_delay + grace_period = {cfg_drain:g}")

    kinds = {}
    for name, d in docs:
        kinds.setdefault(d.get("kind"), []).append(d)
        check(d.get("apiVersion") == {"ServiceIntentions": "consul.hashicorp.com/v1alpha1",
                                      "ServiceDefaults": "consul.hashicorp.com/v1alpha1"}.get(d.get("kind"), API_VERSIONS.get(d.get("kind"))),
              f"{name}: {d.get('kind')} has apiVersion {d.get('apiVersion')!r}")
        check(DNS1123.match(str((d.get("metadata") or {}).get("name", ""))), f"{name}: {d.get('kind')} metadata.name missing or not DNS-1123")
    named = lambda kind: {(d.get("metadata") or {}).get("name"): d for d in kinds.get(kind, [])}
    deps, svcs, sas = named("Deployment"), named("Service"), named("ServiceAccount")
    defaults = named("ServiceDefaults")
    intents = {((d.get("spec") or {}).get("destination") or {}).get("name"): d for d in kinds.get("ServiceIntentions", [])}
    wildcard = ((intents.get("*") or {}).get("spec") or {}).get("sources") or []
    check(any(s.get("name") == "*" and s.get("action") == "deny" for s in wildcard),
          "mesh/: needs a ServiceIntentions with destination `*` and source `*` deny")
    def_ports = {}
    for d in defs.values():
        def_ports.setdefault(d.get("name"), set()).add(d.get("port"))
    for svc in mesh:
        where = f"mesh/ {svc}"
        check(intention_allows((intents.get(svc) or {}).get("spec", {}).get("sources"), identity),
              f"{where}: no ServiceIntentions allows {identity!r}")
        check(((defaults.get(svc) or {}).get("spec") or {}).get("protocol") in ("http", "http2", "grpc"),
              f"{where}: ServiceDefaults with an HTTP protocol missing (L7 intentions, 403 on deny)")
        dep = deps.get(svc)
        if not check(dep, f"{where}: no Deployment"):
            continue
        tmpl = (dep.get("spec") or {}).get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        check(((tmpl.get("metadata") or {}).get("annotations") or {}).get("consul.hashicorp.com/connect-inject") == "true",
              f"{where}: pod template needs consul.hashicorp.com/connect-inject: \"true\"")
        check(labels_match(((dep.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}, labels),
              f"{where}: Deployment selector does not match its pod labels")
        pod = tmpl.get("spec") or {}
        check(pod.get("serviceAccountName") == svc and svc in sas,
              f"{where}: needs ServiceAccount {svc} (Consul's service name with ACLs)")
        cs = pod.get("containers") or []
        c = cs[0] if cs else {}
        argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        port = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else None
        check(argv and argv[0].endswith("mock-service") and argv[2:3] == [svc],
              f"{where}: container should run mock-service PORT {svc}")
        check(port in def_ports.get(svc, set()),
              f"{where}: port {port} is not one of consul/mesh's {sorted(def_ports.get(svc, set()))}")
        cports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        check(port in cports.values(), f"{where}: containerPort {port} missing")
        ks = svcs.get(svc)
        if check(ks, f"{where}: no Kubernetes Service named {svc} (Consul on Kubernetes names the service after it)"):
            kspec = ks.get("spec") or {}
            check(labels_match(kspec.get("selector") or {}, labels), f"{where}: Service selector does not match the pods")
            for p in kspec.get("ports") or []:
                tp = p.get("targetPort", p.get("port"))
                check((tp in cports) if isinstance(tp, str) else (tp in cports.values()),
                      f"{where}: Service targetPort {tp!r} is not a container port")


def check_mesh(base):
    cfg, identity, mesh = mesh_gateway_config()
    defs = check_mesh_consul(identity, mesh)
    check_mesh_compose(cfg, identity, mesh, defs)
    check_mesh_k8s(identity, mesh, defs, base)


def main():
    base = check_k8s()
    defs = check_consul()
    check_compose(defs)
    check_mesh(base)
    for f in failures:
        print(f"FAIL {f}")
    print(f"deploy: {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
