#!/usr/bin/python3
"""Clients and bookkeeping for scripts/soak.

  soak_helper.py idle HOST SECONDS          ftplib session: login, NOOP every
                                            few seconds, QUIT after SECONDS
  soak_helper.py abort HOST                 RETR data.bin, then either ABOR
                                            after some bytes or drop both
                                            connections with a reset
  soak_helper.py junk HOST                  a short burst of junk on the
                                            control port (binary, long lines,
                                            bare LFs, telnet IAC, bad PORTs)
  soak_helper.py sample ELAPSED PID METRICS EVENTS DENY [LABEL]
                                            one progress line on stdout, and
                                            the same figures as a JSON line on
                                            stderr (the caller appends it to
                                            its samples file)
  soak_helper.py summary SAMPLES EVENTS DENY FAULTS
                                            the final summary and trends

Every network wait has a timeout; every loop is bounded.
"""
import collections
import ftplib
import json
import os
import random
import socket
import struct
import sys
import time

USER = PASS = "ftptest"


def idle(host, seconds):
    f = ftplib.FTP(host, timeout=15)
    f.login(USER, PASS)
    f.voidcmd("TYPE I")
    f.pwd()
    until = time.time() + float(seconds)
    for _ in range(1000):
        if time.time() >= until:
            break
        time.sleep(min(5.0, max(0.0, until - time.time())))
        f.voidcmd("NOOP")
    f.quit()


def abort(host):
    f = ftplib.FTP(host, timeout=15)
    f.login(USER, PASS)
    f.voidcmd("TYPE I")
    conn = f.transfercmd("RETR data.bin")
    conn.settimeout(15)
    want = random.randint(10_000, 1_000_000)
    got = 0
    while got < want:
        b = conn.recv(65536)
        if not b:
            break
        got += len(b)
    if random.random() < 0.5:
        # RFC 959 ABOR: the server answers 426 (or 226) and then 226/225.
        f.sock.sendall(b"ABOR\r\n")
        conn.close()
        f.sock.settimeout(15)
        for _ in range(3):
            line = f.getmultiline()
            if line[:3] in ("225", "226"):
                break
        f.quit()
    else:
        # Vanish: reset both connections, no QUIT.
        for s in (conn, f.sock):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


def junk(host):
    payloads = [
        bytes(random.getrandbits(8) for _ in range(4096)),
        b"A" * 20000 + b"\r\n",
        b"\n" * 500,
        b"\xff\xf4\xff\xf2" * 100 + b"NOOP\r\n",
        b"PORT 999,1,1,1,1,1\r\nPORT 192,0,2,99,0,25\r\nEPRT |9|x|1|\r\n",
        b"USER ftptest\r\nPASS ftptest\r\n" + b"\x00" * 1000 + b"\r\nQUIT\r\n",
    ]
    for p in random.sample(payloads, 3):
        try:
            with socket.create_connection((host, 21), timeout=5) as s:
                s.settimeout(2)
                try:
                    s.recv(4096)
                    s.sendall(p)
                    until = time.time() + 2
                    while time.time() < until and s.recv(65536):
                        pass
                except OSError:
                    pass
        except OSError:
            pass


def parse_metrics(path):
    out = collections.defaultdict(float)
    try:
        text = open(path).read()
    except OSError:
        return None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        try:
            out[name] += float(value)
        except ValueError:
            pass
    return out


def proc(pid):
    rss = fds = None
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return rss, fds


def events(path):
    ok = collections.Counter()
    bad = collections.Counter()
    nbytes = 0
    try:
        for line in open(path):
            p = line.split()
            if len(p) < 3:
                continue
            kind, result = p[1], p[2]
            if result == "ok":
                ok[kind] += 1
                if len(p) > 3 and p[3].isdigit():
                    nbytes += int(p[3])
            else:
                bad[f"{kind}:{result}"] += 1
    except OSError:
        pass
    return ok, bad, nbytes


def denials(path):
    c = collections.Counter()
    try:
        for line in open(path, errors="replace"):
            try:
                c[json.loads(line).get("reason", "?")] += 1
            except ValueError:
                c["unparsable_line"] += 1
    except OSError:
        pass
    return c


def fmt_counter(c, limit=8):
    items = c.most_common(limit)
    s = " ".join(f"{k}={v}" for k, v in items)
    if len(c) > limit:
        s += f" (+{len(c) - limit} more)"
    return s or "-"


def sample(elapsed, pid, metrics, evpath, deny, label=""):
    m = parse_metrics(metrics) or {}
    rss, fds = proc(pid)
    ok, bad, client_bytes = events(evpath)
    d = denials(deny)
    rec = {
        "t": int(elapsed),
        "label": label,
        "rss_kb": rss,
        "fds": fds,
        "sessions_total": int(m.get("ftpgate_sessions_total", 0)),
        "sessions_active": int(m.get("ftpgate_sessions_active", 0)),
        "pinholes_open": int(m.get("ftpgate_pinholes_open", 0)),
        "data_active": int(m.get("ftpgate_data_connections_active", 0)),
        "gw_bytes": int(m.get("ftpgate_data_bytes_total", 0)),
        "client_ok": sum(ok.values()),
        "client_bytes": client_bytes,
        "errors": dict(bad),
        "denials": dict(d),
        "metrics_ok": bool(m),
    }
    t = int(elapsed)
    print(
        f"[{t // 60:3d}m{t % 60:02d}s] sessions {rec['sessions_total']} "
        f"(active {rec['sessions_active']}, pinholes {rec['pinholes_open']}, "
        f"data {rec['data_active']}) bytes {rec['gw_bytes'] / 1e6:.0f} MB "
        f"ok {rec['client_ok']} | errors {fmt_counter(bad, 5)} | "
        f"deny {fmt_counter(d, 5)} | RSS {rss} kB fds {fds}"
        + (f" [{label}]" if label else ""),
        flush=True,
    )
    print(json.dumps(rec), file=sys.stderr, flush=True)


def trend(values):
    """Least-squares slope per minute of (t, v) pairs."""
    pts = [(t, v) for t, v in values if v is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mv = sum(v for _, v in pts) / n
    den = sum((t - mt) ** 2 for t, _ in pts)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in pts) / den * 60


def summary(samples, evpath, deny, faults):
    recs = [json.loads(l) for l in open(samples) if l.strip()]
    running = [r for r in recs if r["label"] == ""]
    idle = {r["label"]: r for r in recs if r["label"]}
    ok, bad, client_bytes = events(evpath)
    d = denials(deny)
    f = collections.Counter(l.split()[1] for l in open(faults) if len(l.split()) > 1) if os.path.exists(faults) else {}
    last = recs[-1] if recs else {}
    print("==== soak summary ====")
    print(f"duration              {last.get('t', 0) // 60}m{last.get('t', 0) % 60:02d}s, {len(running)} samples")
    print(f"sessions (gateway)    {last.get('sessions_total')}")
    print(f"bytes relayed         {last.get('gw_bytes', 0) / 1e6:.1f} MB (gateway metric; client-verified {client_bytes / 1e6:.1f} MB)")
    print(f"client operations ok  {sum(ok.values())}: {fmt_counter(ok, 20)}")
    print(f"client errors         {sum(bad.values())}: {fmt_counter(bad, 20)}")
    badsum = sum(v for k, v in bad.items() if k.endswith(":badsum"))
    print(f"checksum mismatches   {badsum} (transfers that reported success but differ)")
    print(f"faults injected       {sum(f.values()) if f else 0}: {fmt_counter(collections.Counter(f), 20) if f else '-'}")
    print(f"deny lines by reason  {fmt_counter(d, 30)}")
    for label in ("idle-start", "idle-end"):
        r = idle.get(label)
        if r:
            print(f"{label:21s} RSS {r['rss_kb']} kB, fds {r['fds']}, sessions {r['sessions_active']}, pinholes {r['pinholes_open']}, data {r['data_active']}")
    rss = [(r["t"], r["rss_kb"]) for r in running]
    fds = [(r["t"], r["fds"]) for r in running]
    if running:
        third = max(1, len(running) // 3)
        avg = lambda xs: sum(v for _, v in xs if v is not None) / max(1, sum(1 for _, v in xs if v is not None))
        print(f"RSS kB under load     first third avg {avg(rss[:third]):.0f}, last third avg {avg(rss[-third:]):.0f}, max {max((v for _, v in rss if v), default=0)}, slope {fmt_slope(trend(rss))} kB/min")
        print(f"fds under load        first third avg {avg(fds[:third]):.1f}, last third avg {avg(fds[-third:]):.1f}, max {max((v for _, v in fds if v), default=0)}, slope {fmt_slope(trend(fds))} /min")
    print("(trend only, not a verdict: RSS grows while allocator arenas warm up;")
    print(" compare idle-start with idle-end for what the gateway keeps)")


def fmt_slope(s):
    return "n/a" if s is None else f"{s:+.1f}"


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    random.seed()
    try:
        if cmd == "idle":
            idle(*args)
        elif cmd == "abort":
            abort(*args)
        elif cmd == "junk":
            junk(*args)
        elif cmd == "sample":
            sample(*args)
        elif cmd == "summary":
            summary(*args)
        else:
            sys.exit(f"unknown command {cmd}")
    except (OSError, EOFError, ftplib.Error) as e:
        print(f"{cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
