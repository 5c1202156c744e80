#!/usr/bin/env bash
# bench/mesh/certs.sh DIR TRUST_DOMAIN [DC]: a Consul-like Connect CA and leaves, made with the
# openssl CLI: an EC P-256 CA whose URI SAN is spiffe://TRUST_DOMAIN, a leaf for the gateway
# (svc/meshgate) and one per bench service (svc/web, svc/web-fresh), each valid for 3 days.
set -euo pipefail
dir="${1:?usage: certs.sh DIR TRUST_DOMAIN [DC]}"; td="${2:?trust domain}"; dc="${3:-dc1}"
mkdir -p "$dir"
cd "$dir"

openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 3 -subj "/CN=Consul CA 1" -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
  -addext "subjectAltName=URI:spiffe://$td" 2>/dev/null

serial=1
for svc in meshgate web web-fresh; do
  serial=$((serial + 1))
  # SEC1 ("EC PRIVATE KEY"), as Consul's leaf answers carry it
  openssl ecparam -name prime256v1 -genkey -noout -out "$svc.key" 2>/dev/null
  openssl req -new -key "$svc.key" -subj "/CN=$svc" -out "$svc.csr" 2>/dev/null
  cat >"$svc.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=URI:spiffe://$td/ns/default/dc/$dc/svc/$svc
EXT
  openssl x509 -req -in "$svc.csr" -CA ca.pem -CAkey ca.key -set_serial "$serial" -days 3 \
    -sha256 -extfile "$svc.ext" -out "$svc.pem" 2>/dev/null
  rm -f "$svc.csr" "$svc.ext"
done
chmod 644 ./*.pem ./*.key   # nginx workers (nobody, when started as root) read the sidecar keys
