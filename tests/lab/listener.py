#!/usr/bin/env python3
"""Connection recorder for the bounce target (fg-out3).

Listens on a TCP port (IPv4 and IPv6), and appends one line per event to the
log file, flushed immediately:

    <unix-time> connect peer=<ip> port=<port> local=<ip>:<port>
    <unix-time> close peer=<ip> port=<port> bytes=<n> first=<hex of first 32 bytes>

IPv4 peers are logged as plain dotted quads (not ::ffff:a.b.c.d). Each
connection is read until EOF or 10 s of silence, then closed.

usage: listener.py --port 2525 --log FILE
"""
import argparse
import socket
import sys
import threading
import time

LOCK = threading.Lock()


def plain(addr):
    return addr[7:] if addr.startswith("::ffff:") else addr


def record(path, line):
    with LOCK:
        with open(path, "a", encoding="ascii") as f:
            f.write(f"{time.time():.3f} {line}\n")
            f.flush()


def handle(conn, peer, local, path):
    total = 0
    first = b""
    try:
        conn.settimeout(10)
        while True:
            try:
                chunk = conn.recv(65536)
            except (socket.timeout, OSError):
                break
            if not chunk:
                break
            if len(first) < 32:
                first += chunk[: 32 - len(first)]
            total += len(chunk)
    finally:
        conn.close()
        record(path, f"close peer={peer[0]} port={peer[1]} bytes={total} first={first.hex()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=2525)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()

    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", args.port))
    srv.listen(64)
    print(f"listener: recording connections on port {args.port} into {args.log}", flush=True)
    while True:
        conn, addr = srv.accept()
        peer = (plain(addr[0]), addr[1])
        lh, lp = conn.getsockname()[:2]
        record(args.log, f"connect peer={peer[0]} port={peer[1]} local={plain(lh)}:{lp}")
        threading.Thread(target=handle, args=(conn, peer, None, args.log), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
