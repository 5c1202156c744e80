#!/usr/bin/env python3
"""Open N HTTP/1.1 keep-alive connections to a loopback server and hold them idle.

Used by bench/run.sh for the "idle" scenario (the memory a proxy needs per idle client
connection). Each connection sends one GET and reads the full response, so the server has
set up its per-connection state, then stays open and silent for --hold seconds while the
harness samples the server's memory. Standard library only.

Output, one line each, flushed (the harness reads them):
    OPENED ok=<n> failed=<n> secs=<s>     after the open phase
    HOLDING                                 the hold starts (sample memory now)
    ALIVE alive=<n> closed=<n>              after the hold: connections the server kept
Exit status 0 unless nothing could be opened. Everything is bounded: connect/read timeouts,
an overall --deadline for the open phase, and the hold; SIGTERM/SIGINT end the hold early.
"""

import argparse
import ipaddress
import resource
import select
import signal
import socket
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=10000, help="connections to open (default 10000)")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold them idle (default 5)")
    p.add_argument("--path", default="/")
    p.add_argument("--timeout", type=float, default=5.0, help="per connect/response timeout (s)")
    p.add_argument("--deadline", type=float, default=120.0, help="max seconds for the open phase")
    return p.parse_args()


def read_response(sock, timeout):
    """Read one HTTP/1.1 response (Content-Length or chunked). Returns (status, keep_alive)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before response head")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ConnectionError("response head too large")
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    keep_alive = "close" not in headers.get("connection", "").lower()
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(body) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            body += chunk
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-body")
            body += chunk
    return status, keep_alive


def main():
    args = parse_args()
    if not ipaddress.ip_address(args.host).is_loopback:
        sys.exit("idle-conns.py only connects to loopback addresses")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.conns + 64
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            print(f"warning: open-files limit {new} < {want}; some connections will fail",
                  file=sys.stderr, flush=True)

    stop = {"now": False}

    def on_signal(_sig, _frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
               "User-Agent: meshgate-bench-idle\r\n\r\n").encode()
    socks, failed, first_error = [], 0, None
    t0 = time.monotonic()
    for _ in range(args.conns):
        if stop["now"] or time.monotonic() - t0 > args.deadline:
            failed = args.conns - len(socks)  # the rest count as failed
            break
        s = None
        try:
            s = socket.create_connection((args.host, args.port), timeout=args.timeout)
            s.sendall(request)
            status, keep_alive = read_response(s, args.timeout)
            if status != 200 or not keep_alive:
                raise ConnectionError(f"status {status}, keep-alive {keep_alive}")
            socks.append(s)
        except (OSError, ValueError, IndexError) as e:
            failed += 1
            first_error = first_error or repr(e)
            if s is not None:
                s.close()
    print(f"OPENED ok={len(socks)} failed={failed} secs={time.monotonic() - t0:.2f}", flush=True)
    if first_error:
        print(f"first error: {first_error}", file=sys.stderr, flush=True)

    print("HOLDING", flush=True)
    end = time.monotonic() + args.hold
    while not stop["now"] and time.monotonic() < end:
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    # A connection the server closed is readable and returns b"" on a peek.
    poller = select.poll()
    by_fd = {}
    for s in socks:
        poller.register(s.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        by_fd[s.fileno()] = s
    closed = 0
    for fd, _ev in poller.poll(0):
        s = by_fd[fd]
        try:
            s.setblocking(False)
            if s.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print(f"ALIVE alive={len(socks) - closed} closed={closed}", flush=True)
    for s in socks:
        s.close()
    return 0 if socks else 1


if __name__ == "__main__":
    sys.exit(main())
