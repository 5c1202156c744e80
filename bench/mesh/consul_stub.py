#!/usr/bin/env python3
"""Consul agent stub for bench/mesh.sh: serves the Connect CA roots, the gateway's leaf and the
mesh endpoints of fixed services, with X-Consul-Index and blocking queries (standard library)."""

import argparse
import hashlib
import json
import os
import re
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Nothing ever changes, so every answer has the same index: a blocking query that sends it
# back is held for its whole `wait` (as Consul does) instead of being answered at once.
INDEX = 42
MAX_WAIT = 600.0


def parse_wait(text):
    """Consul's `wait` (`60s`, `60000ms`, `5m`); bad or missing values mean Consul's 5 minutes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text or "")
    if not m:
        return 300.0
    value = float(m.group(1))
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    return min(value * scale, MAX_WAIT)


def fingerprint(pem):
    der = ssl.PEM_cert_to_DER_cert(pem)
    return ":".join(f"{b:02x}" for b in hashlib.sha1(der).digest())


def build_answers(args):
    ca_pem = open(args.ca, encoding="ascii").read()
    cert_pem = open(args.leaf_cert, encoding="ascii").read()
    key_pem = open(args.leaf_key, encoding="ascii").read()
    root_id = fingerprint(ca_pem)
    roots = {
        "ActiveRootID": root_id,
        "TrustDomain": args.trust_domain,
        "Roots": [{
            "ID": root_id,
            "Name": "Consul CA Root Cert",
            "SerialNumber": 1,
            "RootCert": ca_pem,
            "IntermediateCerts": None,
            "Active": True,
            "PrivateKeyType": "ec",
            "PrivateKeyBits": 256,
            "CreateIndex": INDEX,
            "ModifyIndex": INDEX,
        }],
    }
    leaf = {
        "SerialNumber": args.leaf_serial,
        "CertPEM": cert_pem,
        "PrivateKeyPEM": key_pem,
        "Service": args.identity,
        "ServiceURI": f"spiffe://{args.trust_domain}/ns/default/dc/{args.dc}/svc/{args.identity}",
        "ValidAfter": args.valid_after,
        "ValidBefore": args.valid_before,
        "Namespace": "default",
        "CreateIndex": INDEX,
        "ModifyIndex": INDEX,
    }
    health = {}
    for spec in args.service:
        name, _, addr = spec.partition("=")
        host, _, port = addr.rpartition(":")
        if not name or not host or not port.isdigit():
            sys.exit(f"consul_stub: --service wants NAME=HOST:PORT, got {spec!r}")
        health.setdefault(name, []).append({
            "Node": {"ID": "00000000-0000-0000-0000-000000000001", "Node": "bench",
                     "Address": host, "Datacenter": args.dc, "Meta": {}},
            "Service": {
                "Kind": "connect-proxy",
                "ID": f"{name}-sidecar-proxy-{len(health[name]) + 1}",
                "Service": f"{name}-sidecar-proxy",
                "Tags": [],
                "Address": host,
                "Port": int(port),
                "Weights": {"Passing": 1, "Warning": 1},
                "Meta": None,
                "Proxy": {"DestinationServiceName": name, "LocalServiceAddress": host,
                          "Config": {"protocol": "http"}},
                "CreateIndex": INDEX,
                "ModifyIndex": INDEX,
            },
            "Checks": [{"Node": "bench", "CheckID": "serfHealth", "Name": "Serf Health Status",
                        "Status": "passing", "ServiceID": "", "ServiceName": "",
                        "ModifyIndex": INDEX}],
        })
    return roots, leaf, health


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "consul-stub"

    def log_message(self, fmt, *args):  # one line per request, to the log file
        if self.server.verbose:
            sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), fmt % args))
            sys.stderr.flush()

    def answer(self, status, body):
        # Consul answers errors in plain text, successes in JSON.
        text = status != 200
        data = (body + "\n").encode() if text else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Consul-Index", str(INDEX))
            self.send_header("X-Consul-Knownleader", "true")
            self.send_header("X-Consul-Lastcontact", "0")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The gateway went away during a held blocking query (it is stopped first).
            self.close_connection = True

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path
        if path == "/v1/agent/connect/ca/roots":
            body = self.server.roots
        elif path == f"/v1/agent/connect/ca/leaf/{self.server.leaf['Service']}":
            body = self.server.leaf
        elif path.startswith("/v1/agent/connect/ca/leaf/"):
            return self.answer(403, "Permission denied: the bench stub only issues the gateway's leaf")
        elif path.startswith("/v1/health/connect/"):
            body = self.server.health.get(path[len("/v1/health/connect/"):], [])
        else:
            return self.answer(404, f"the bench Consul stub does not serve {path}")
        # Blocking query: the caller already has this index, so hold the (unchanged) answer.
        if query.get("index", [""])[0] == str(INDEX):
            self.server.stopping.wait(parse_wait(query.get("wait", [""])[0]))
        self.answer(200, body)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port-file", required=True, help="the chosen port is written here")
    p.add_argument("--ca", required=True)
    p.add_argument("--leaf-cert", required=True)
    p.add_argument("--leaf-key", required=True)
    p.add_argument("--leaf-serial", required=True)
    p.add_argument("--valid-after", required=True, help="RFC 3339, as the leaf says")
    p.add_argument("--valid-before", required=True)
    p.add_argument("--trust-domain", required=True)
    p.add_argument("--identity", default="meshgate")
    p.add_argument("--dc", default="dc1")
    p.add_argument("--service", action="append", default=[], help="NAME=HOST:PORT (repeatable)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = p.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.roots, server.leaf, server.health = build_answers(args)
    server.stopping = threading.Event()
    server.verbose = args.verbose

    def stop(*_):
        server.stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with open(args.port_file + ".tmp", "w", encoding="ascii") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
