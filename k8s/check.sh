#!/usr/bin/env bash
# k8s/check.sh: validate the deployment files without Docker or a cluster (CI runs this).
#   1. docker-compose.yml with Compose itself: `docker-compose config -q` (Debian's
#      docker-compose package, installed here when missing and we may), or `docker compose`.
#   2. k8s/validate.py: the manifests in k8s/, the Consul definitions in consul/ and their
#      cross-references with docker-compose.yml, and the mesh example (compose profile `mesh`,
#      consul/mesh/, k8s/mesh/) (PyYAML, installed with pip when missing).
#   3. When kubectl or kustomize is installed (not required): `kustomize build` of k8s/ and
#      k8s/mesh/, which catches what the Python checks cannot (patch targets, generator merges).
# Exit status non-zero if any fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

sudo=""
[ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo="sudo -n"; }

echo "== docker-compose.yml"
if command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
  echo "installing docker-compose (Debian package; only its 'config' is used, no Docker engine needed)"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  compose=(docker-compose)
else
  echo "k8s/check.sh: need docker-compose (apt-get install docker-compose) or 'docker compose'" >&2
  exit 1
fi
"${compose[@]}" -f docker-compose.yml config -q
echo "compose config: ok (${compose[*]})"

echo "== k8s/ manifests, consul/ definitions, compose cross-checks"
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "installing PyYAML"
  python3 -m pip install --quiet pyyaml 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages pyyaml
fi
python3 k8s/validate.py

echo "== kustomize builds"
if command -v kubectl >/dev/null 2>&1; then
  build=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
  build=(kustomize build)
else
  build=()
  echo "skipped: neither kubectl nor kustomize installed"
fi
if [ "${#build[@]}" -gt 0 ]; then
  for dir in k8s k8s/mesh; do
    "${build[@]}" "$dir" >/dev/null
    echo "$dir: ok (${build[*]})"
  done
fi
