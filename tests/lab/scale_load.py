#!/usr/bin/env python3
"""FTP sessions through a balancer, for tests/scale_out.rs.

scale_load.py HOST --sessions N --concurrency C --file NAME --sha256 HEX
              --out RESULTS.jsonl [--modes pasv,epsv,port] [--slow]
              [--user ftptest --password ftptest] [--deadline SECONDS]

Each session: connect, log in, TYPE I, one download of NAME in its mode
(PASV, EPSV or PORT, taking turns), sha256 checked, QUIT. One JSON line per
session to RESULTS: index, mode, start and end (epoch seconds), ok, error,
the host of the 227 reply (pasv), the data port the client connected to
(pasv, epsv) and the address the data connection came from (port): the
test tells from them which instance carried the session. --slow reads the
download in 16 KiB pieces 50 ms apart, so sessions are in flight when an
instance is killed or drained. Prints one summary line at the end.
Bounded: every socket has a 10 s timeout, the whole run --deadline.
"""

import argparse
import ftplib
import hashlib
import json
import socket
import sys
import threading
import time


def session(args, i, mode):
    rec = {"index": i, "mode": mode, "start": time.time(), "ok": False}
    try:
        ftp = ftplib.FTP(timeout=10)
        ftp.connect(args.host, 21)
        try:
            ftp.login(args.user, args.password)
            ftp.voidcmd("TYPE I")
            h = hashlib.sha256()
            listener = None
            if mode == "pasv":
                reply = ftp.sendcmd("PASV")
                host, port = ftplib.parse227(reply)
                rec["pasv_host"] = host
                rec["data_port"] = port
                data = socket.create_connection((args.host, port), timeout=10)
            elif mode == "epsv":
                reply = ftp.sendcmd("EPSV")
                _, port = ftplib.parse229(reply, ftp.sock.getpeername())
                rec["data_port"] = port
                data = socket.create_connection((args.host, port), timeout=10)
            else:
                local = ftp.sock.getsockname()[0]
                listener = socket.create_server((local, 0))
                listener.settimeout(10)
                ftp.sendport(local, listener.getsockname()[1])
                data = None
            resp = ftp.sendcmd("RETR " + args.file)
            if not resp.startswith("1"):
                raise ftplib.error_reply(resp)
            if listener is not None:
                data, peer = listener.accept()
                listener.close()
                rec["data_from"] = peer[0]
            data.settimeout(10)
            while True:
                chunk = data.recv(16384)
                if not chunk:
                    break
                h.update(chunk)
                if args.slow:
                    time.sleep(0.05)
            data.close()
            ftp.voidresp()
            if h.hexdigest() != args.sha256:
                raise ValueError("sha256 mismatch")
            ftp.quit()
            rec["ok"] = True
        finally:
            ftp.close()
    except Exception as e:  # every failure is a result, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["end"] = time.time()
    return rec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("--sessions", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--file", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="pasv,epsv,port")
    p.add_argument("--slow", action="store_true")
    p.add_argument("--user", default="ftptest")
    p.add_argument("--password", default="ftptest")
    p.add_argument("--deadline", type=float, default=240)
    args = p.parse_args()
    modes = args.modes.split(",")
    lock = threading.Lock()
    next_i = [0]
    results = []
    stop_at = time.time() + args.deadline

    def worker():
        while time.time() < stop_at:
            with lock:
                i = next_i[0]
                if i >= args.sessions:
                    return
                next_i[0] += 1
            rec = session(args, i, modes[i % len(modes)])
            with lock:
                results.append(rec)

    began = time.time()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(args.out, "w") as f:
        for rec in sorted(results, key=lambda r: r["index"]):
            f.write(json.dumps(rec) + "\n")
    ok = sum(1 for r in results if r["ok"])
    print(
        f"RESULT sessions={len(results)} ok={ok} failed={len(results) - ok} "
        f"seconds={time.time() - began:.1f}"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
