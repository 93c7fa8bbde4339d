#!/usr/bin/env python3
"""Load generators and the report for scripts/bench (Python standard library only).

Subcommands (each bounded in count and time; each prints one JSON object):

  sessions      full FTP sessions at a fixed concurrency: connect, USER/PASS,
                TYPE I, EPSV (or PASV), RETR a small file, QUIT; sessions/s, p50/p99
                session time, failures
  rtt           one logged-in session, NOOP round trips one at a time
  idle-server   a tiny FTP server that only answers 220/USER/PASS/NOOP/QUIT
                (for 10,000 idle sessions: vsftpd forks two processes each)
  idle-clients  open N control sessions, log each in, hold them; VmRSS of a
                process (ftpgate) before, with all of them, and after closing
  report        the markdown table from the raw JSON-lines log

Extra `--label key=value` pairs are copied into the printed object, so the
caller can tag a result with its path and round and append it to the log.
"""

import argparse
import asyncio
import json
import re
import socket
import statistics
import sys
import time


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return ordered[int(rank) - 1]


def labels(pairs):
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out


def emit(args, obj):
    obj = {**labels(args.label), **obj}
    print(json.dumps(obj, sort_keys=True), flush=True)


# ---- FTP client pieces --------------------------------------------------------


class FtpError(Exception):
    pass


async def read_reply(reader, timeout):
    """One complete reply (RFC 959 4.2: multi-line replies end with 'ddd ')."""
    line = await asyncio.wait_for(reader.readline(), timeout)
    if not line:
        raise FtpError("connection closed")
    code = line[:3]
    text = line
    if line[3:4] == b"-":
        for _ in range(1000):
            more = await asyncio.wait_for(reader.readline(), timeout)
            if not more:
                raise FtpError("connection closed in a multi-line reply")
            text += more
            if more[:3] == code and more[3:4] == b" ":
                break
        else:
            raise FtpError("multi-line reply too long")
    try:
        return int(code), text.decode("latin-1").strip()
    except ValueError:
        raise FtpError(f"not an FTP reply: {line[:60]!r}") from None


async def command(reader, writer, line, want, timeout):
    writer.write(line.encode("latin-1") + b"\r\n")
    await writer.drain()
    code, text = await read_reply(reader, timeout)
    if code not in want:
        raise FtpError(f"{line.split()[0]}: {text[:80]}")
    return text


async def login(host, port, user, password, timeout):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        code, text = await read_reply(reader, timeout)
        if code != 220:
            raise FtpError(f"greeting: {text[:80]}")
        text = await command(reader, writer, f"USER {user}", (331, 230), timeout)
        if not text.startswith("230"):  # 230 at once: no password needed
            await command(reader, writer, f"PASS {password}", (230,), timeout)
    except BaseException:
        writer.close()
        raise
    return reader, writer


EPSV_RE = re.compile(r"\(\|\|\|(\d+)\|\)")
PASV_RE = re.compile(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")


PHASES = ("login", "type", "passive", "data_connect", "retr_mark", "data", "final", "quit")


async def one_session(args, marks):
    """connect, login, TYPE I, EPSV/PASV, RETR, QUIT; returns the bytes received.

    Appends the time at the end of each of PHASES to `marks`."""
    reader, writer = await login(args.host, args.port, args.user, args.password, args.timeout)
    marks.append(time.perf_counter())
    data_writer = None
    try:
        await command(reader, writer, "TYPE I", (200,), args.timeout)
        marks.append(time.perf_counter())
        if args.pasv:
            text = await command(reader, writer, "PASV", (227,), args.timeout)
            m = PASV_RE.search(text)
            if not m:
                raise FtpError(f"bad 227: {text[:80]}")
            n = [int(x) for x in m.groups()]
            data_host, data_port = ".".join(map(str, n[:4])), n[4] * 256 + n[5]
        else:
            text = await command(reader, writer, "EPSV", (229,), args.timeout)
            m = EPSV_RE.search(text)
            if not m:
                raise FtpError(f"bad 229: {text[:80]}")
            data_host, data_port = args.host, int(m.group(1))
        marks.append(time.perf_counter())
        data_reader, data_writer = await asyncio.wait_for(
            asyncio.open_connection(data_host, data_port), args.timeout
        )
        marks.append(time.perf_counter())
        await command(reader, writer, f"RETR {args.file}", (125, 150), args.timeout)
        marks.append(time.perf_counter())
        got = 0
        for _ in range(1_000_000):
            chunk = await asyncio.wait_for(data_reader.read(65536), args.timeout)
            if not chunk:
                break
            got += len(chunk)
        data_writer.close()
        data_writer = None
        marks.append(time.perf_counter())
        code, text = await read_reply(reader, args.timeout)
        if code != 226:
            raise FtpError(f"after RETR: {text[:80]}")
        if args.expect_size is not None and got != args.expect_size:
            raise FtpError(f"RETR gave {got} bytes, expected {args.expect_size}")
        marks.append(time.perf_counter())
        await command(reader, writer, "QUIT", (221,), args.timeout)
        marks.append(time.perf_counter())
        return got
    finally:
        if data_writer is not None:
            data_writer.close()
        writer.close()


async def sessions_main(args):
    durations = []
    phases = {name: [] for name in PHASES}
    errors = {}
    started = 0
    deadline = time.monotonic() + args.deadline

    async def worker():
        nonlocal started
        while started < args.count and time.monotonic() < deadline:
            started += 1
            t0 = time.perf_counter()
            marks = [t0]
            try:
                await asyncio.wait_for(one_session(args, marks), args.timeout * 4)
                durations.append(time.perf_counter() - t0)
                for name, a, b in zip(PHASES, marks, marks[1:]):
                    phases[name].append((b - a) * 1000)
            except (OSError, FtpError, asyncio.TimeoutError) as e:
                # the step it failed in: the first one without an end mark
                step = PHASES[min(len(marks) - 1, len(PHASES) - 1)]
                key = f"{type(e).__name__} in {step}: {e}"[:120]
                errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    failed = sum(errors.values())
    result = {
        "part": "sessions",
        "concurrency": args.concurrency,
        "ok": len(durations),
        "failed": failed,
        "elapsed_s": round(elapsed, 3),
        "rate": round(len(durations) / elapsed, 2) if elapsed > 0 else 0,
        "hit_deadline": started < args.count,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }
    if durations:
        ms = [d * 1000 for d in durations]
        result.update(
            p50_ms=round(percentile(ms, 50), 3),
            p99_ms=round(percentile(ms, 99), 3),
            mean_ms=round(statistics.fmean(ms), 3),
            max_ms=round(max(ms), 3),
            # sessions that took a second or more: typically a lost SYN
            # retransmitted after the 1 s initial RTO (RFC 6298)
            over_1s=sum(1 for m in ms if m >= 1000),
            # where a session's time goes: p50 ms of each step
            phases_p50_ms={k: round(percentile(v, 50), 3) for k, v in phases.items() if v},
        )
    return result


# ---- NOOP round trips -----------------------------------------------------------


def rtt_main(args):
    deadline = time.monotonic() + args.deadline
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""

    def reply():
        nonlocal buf
        while b"\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise FtpError("connection closed")
            buf += chunk
        line, _, buf = buf.partition(b"\r\n")
        return line.decode("latin-1")

    def cmd(text, want):
        sock.sendall(text.encode() + b"\r\n")
        line = reply()
        if not line.startswith(want):
            raise FtpError(f"{text.split()[0]}: {line[:80]}")

    try:
        if not reply().startswith("220"):
            raise FtpError("no 220 greeting")
        cmd(f"USER {args.user}", "331")
        cmd(f"PASS {args.password}", "230")
        for _ in range(args.warmup):
            cmd("NOOP", "200")
        samples = []
        for _ in range(args.count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter_ns()
            cmd("NOOP", "200")
            samples.append((time.perf_counter_ns() - t0) / 1000)
        cmd("QUIT", "221")
    finally:
        sock.close()
    return {
        "part": "rtt",
        "n": len(samples),
        "p50_us": round(percentile(samples, 50), 1),
        "p99_us": round(percentile(samples, 99), 1),
        "mean_us": round(statistics.fmean(samples), 1),
        "min_us": round(min(samples), 1),
    }


# ---- idle sessions ----------------------------------------------------------------


async def idle_server_main(args):
    async def handle(reader, writer):
        try:
            writer.write(b"220 fgb idle server\r\n")
            await writer.drain()
            for _ in range(100_000):
                line = await asyncio.wait_for(reader.readline(), args.idle_timeout)
                if not line:
                    break
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb == b"USER":
                    writer.write(b"331 password please\r\n")
                elif verb == b"PASS":
                    writer.write(b"230 logged in\r\n")
                elif verb == b"NOOP":
                    writer.write(b"200 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"502 not implemented\r\n")
                await writer.drain()
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(
        handle, args.bind, args.port, backlog=4096, reuse_address=True
    )
    print(f"idle-server listening on {args.bind}:{args.port}", flush=True)
    async with server:
        await asyncio.sleep(args.lifetime)


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def idle_clients_main(args):
    deadline = time.monotonic() + args.deadline
    rss_before = vm_rss_kib(args.pid)
    held = []
    errors = {}
    gate = asyncio.Semaphore(args.open_concurrency)

    async def open_one():
        async with gate:
            if time.monotonic() > deadline:
                errors["deadline"] = errors.get("deadline", 0) + 1
                return
            try:
                held.append(await login(args.host, args.port, args.user, args.password, args.timeout))
            except (OSError, FtpError, asyncio.TimeoutError) as e:
                # the step it failed in: the first one without an end mark
                step = PHASES[min(len(marks) - 1, len(PHASES) - 1)]
                key = f"{type(e).__name__} in {step}: {e}"[:120]
                errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(args.count)))
    open_s = time.perf_counter() - t0
    await asyncio.sleep(args.settle)
    rss_loaded = vm_rss_kib(args.pid)

    # Every held session must still be alive end to end: one NOOP each.
    alive = 0

    async def noop(pair):
        nonlocal alive
        async with gate:
            try:
                await command(pair[0], pair[1], "NOOP", (200,), args.timeout)
                alive += 1
            except (OSError, FtpError, asyncio.TimeoutError):
                pass

    await asyncio.gather(*(noop(p) for p in held))
    for _, writer in held:
        writer.close()
    await asyncio.sleep(args.settle)
    rss_closed = vm_rss_kib(args.pid)
    opened = len(held)
    return {
        "part": "idle",
        "requested": args.count,
        "opened": opened,
        "alive_after_noop": alive,
        "failed": sum(errors.values()),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "open_s": round(open_s, 2),
        "rss_before_kib": rss_before,
        "rss_loaded_kib": rss_loaded,
        "rss_closed_kib": rss_closed,
        "kib_per_session": round((rss_loaded - rss_before) / opened, 2) if opened else None,
    }


# ---- report ---------------------------------------------------------------------

PATH_TITLES = {
    "direct": "direct (routing)",
    "helper": "kernel helper (nf_conntrack_ftp + masquerade)",
    "proxy": "ftpgate, plane = proxy",
    "kernel": "ftpgate, plane = kernel",
}
PATHS = list(PATH_TITLES)


def median(values):
    return statistics.median(values) if values else None


def fmt(value, digits=0):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def report_main(args):
    rows = [json.loads(line) for line in open(args.log) if line.strip().startswith("{")]
    meta = {}
    unavailable = {}
    for r in rows:
        if r.get("part") == "meta":
            meta.update(r)
        elif r.get("part") == "path" and not r.get("available", True):
            unavailable[r["path"]] = r.get("why", "")
    parts = set(meta.get("parts", "").split(","))
    table = []

    def cells(func):
        out = []
        for p in PATHS:
            if p in unavailable:
                out.append("n/a (not available in this build)")
            else:
                out.append(func(p))
        return out

    # bulk
    gib = 1024**3
    bulk = [r for r in rows if r.get("part") == "bulk" and r.get("ok")]
    bulk_failed = [r for r in rows if r.get("part") == "bulk" and not r.get("ok")]
    if "bulk" in parts:
        for direction in ("download", "upload"):
            for mode in ("epsv", "port"):
                runs = {
                    p: [r for r in bulk if r["path"] == p and r["dir"] == direction and r["mode"] == mode]
                    for p in PATHS
                }
                mbps = {p: median([r["bytes"] / r["seconds"] / 1e6 for r in runs[p]]) for p in PATHS}
                label = f"{direction} {'passive (EPSV)' if mode == 'epsv' else 'active (PORT)'}"

                def speed(p, mbps=mbps, runs=runs, direction=direction, mode=mode):
                    failed = sum(
                        1
                        for r in bulk_failed
                        if r["path"] == p and r["dir"] == direction and r["mode"] == mode
                    )
                    if mbps[p] is None:
                        return f"failed ({failed} runs)" if failed else "–"
                    text = fmt(mbps[p])
                    if p != "helper" and mbps.get("helper"):
                        text += f" ({mbps[p] / mbps['helper']:.2f}× helper)"
                    if failed:
                        text += f", {failed} failed"
                    return text

                def cpu(p, runs=runs):
                    if not runs[p]:
                        return "–"
                    fg = median([r["fg_cpu_s"] / (r["bytes"] / gib) for r in runs[p]])
                    si = median([r["softirq_s"] / (r["bytes"] / gib) for r in runs[p]])
                    if p in ("direct", "helper"):
                        return f"– / {si:.2f}"
                    return f"{fg:.2f} / {si:.2f}"

                table.append([f"{label}: MB/s", *cells(speed)])
                table.append([f"{label}: CPU s/GiB, ftpgate / softirq", *cells(cpu)])

        verify = [r for r in rows if r.get("part") == "verify"]

        def checked(p):
            mine = [r for r in verify if r["path"] == p]
            if not mine:
                return "–"
            bad = [f"{r['dir']} {r['mode']}" for r in mine if not r["ok"]]
            return "MISMATCH: " + ", ".join(bad) if bad else "ok"

        table.append(["sha256 of one EPSV download and one PORT upload", *cells(checked)])

    # sessions
    if "sessions" in parts:
        sess = [r for r in rows if r.get("part") == "sessions"]
        overflows = [r for r in rows if r.get("part") == "listen_overflows"]
        for conc in sorted({r["concurrency"] for r in sess}):
            runs = {p: [r for r in sess if r["path"] == p and r["concurrency"] == conc] for p in PATHS}
            rate = {p: median([r["rate"] for r in runs[p]]) for p in PATHS}

            def srate(p, rate=rate):
                if rate[p] is None:
                    return "–"
                text = fmt(rate[p])
                if p != "direct" and rate.get("direct"):
                    text += f" ({rate[p] / rate['direct']:.2f}× direct)"
                return text

            def stime(p, runs=runs, conc=conc):
                ok = [r for r in runs[p] if "p50_ms" in r]
                failed = sum(r["failed"] for r in runs[p])
                if not runs[p]:
                    return "–"
                if not ok:
                    return f"all failed ({failed})"
                p50 = median([r["p50_ms"] for r in ok])
                p99 = median([r["p99_ms"] for r in ok])
                slow = sum(r.get("over_1s", 0) for r in ok)
                drops = sum(
                    r["count"]
                    for r in overflows
                    if r["path"] == p and r["concurrency"] == conc
                )
                return f"{p50:.1f} / {p99:.1f}; {slow} ≥ 1 s, {drops} overflows; {failed} failed"

            def per_session(key, scale, digits, paths=None, runs=runs, conc=conc):
                """Median over rounds of a session_cpu figure per attempted session."""

                def cell(p):
                    per = []
                    for c in rows:
                        if c.get("part") != "session_cpu" or c["path"] != p or c["concurrency"] != conc:
                            continue
                        done = [r["ok"] + r["failed"] for r in runs[p] if r.get("round") == c["round"]]
                        if done and done[0] and key in c:
                            per.append(c[key] / done[0] * scale)
                    return fmt(median(per), digits) if per and (paths is None or p in paths) else "–"

                return cell

            scpu = per_session("fg_cpu_s", 1e6, 0, paths=("proxy", "kernel"))
            sedge = per_session("edge_cpu_s", 1e6, 0)
            spackets = per_session("edge_packets", 1, 1)

            table.append([f"sessions/s, concurrency {conc}", *cells(srate)])
            table.append([f"c={conc}: ftpgate CPU µs per session", *cells(scpu)])
            if any(r.get("part") == "session_cpu" and "edge_cpu_s" in r for r in rows):
                table.append([f"c={conc}: edge CPU busy µs per session (all its work, --edge-cpu)", *cells(sedge)])
            table.append([f"c={conc}: packets through the edge's interfaces per session", *cells(spackets)])
            table.append(
                [
                    f"c={conc}: session ms p50 / p99; sessions ≥ 1 s, vsftpd listen-queue overflows; failures",
                    *cells(stime),
                ]
            )

    # NOOP round trip
    if "rtt" in parts:
        rtt = [r for r in rows if r.get("part") == "rtt"]
        by = {p: [r for r in rtt if r["path"] == p] for p in PATHS}

        def noop(p):
            if not by[p]:
                return "–"
            return f"{median([r['p50_us'] for r in by[p]]):.0f} / {median([r['p99_us'] for r in by[p]]):.0f}"

        def added(p):
            if p == "direct" or not by[p] or not by["direct"]:
                return "–"
            # pair each run with the direct run of the same round
            direct = {r["round"]: r for r in by["direct"]}
            d50 = [r["p50_us"] - direct[r["round"]]["p50_us"] for r in by[p] if r["round"] in direct]
            d99 = [r["p99_us"] - direct[r["round"]]["p99_us"] for r in by[p] if r["round"] in direct]
            if not d50:
                return "–"
            return f"{median(d50):+.0f} / {median(d99):+.0f}"

        table.append(["NOOP round trip µs, p50 / p99", *cells(noop)])
        table.append(["added NOOP round trip vs direct µs, p50 / p99", *cells(added)])

    # idle sessions
    if "idle" in parts:
        idle = {r["path"]: r for r in rows if r.get("part") == "idle"}

        def per_session(p):
            r = idle.get(p)
            if p in ("direct", "helper"):
                return "–"
            if r is None:
                return "–"
            if not r.get("opened"):
                return f"failed ({r.get('failed')} sessions)"
            text = f"{r['kib_per_session']:.1f} KiB ({r['opened']:,} sessions"
            if r["opened"] != r["requested"]:
                text += f" of {r['requested']:,}"
            return text + ")"

        count = meta.get("idle_sessions", 0)
        requested = meta.get("idle_requested", count)
        what = f"{count:,} sessions" if count == requested else f"{count:,} sessions, {requested:,} requested"
        table.append([f"ftpgate RSS per idle logged-in session ({what})", *cells(per_session)])

    header = ["", *(PATH_TITLES[p] for p in PATHS)]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        out.append("| " + " | ".join(row) + " |")
    print("\n".join(out))
    return None


def summary_main():
    """One line for the progress log from one result object on stdin."""
    r = json.loads(sys.stdin.readline())
    part = r.get("part")
    if part == "sessions":
        print(
            f"{r['rate']} sessions/s, p50 {r.get('p50_ms')} ms, p99 {r.get('p99_ms')} ms, "
            f"max {r.get('max_ms')} ms, {r.get('over_1s', 0)} took >= 1 s, "
            f"{r['failed']} failed{' ' + str(r['errors']) if r['errors'] else ''}"
        )
    elif part == "rtt":
        print(f"p50 {r['p50_us']} us, p99 {r['p99_us']} us over {r['n']} NOOPs")
    elif part == "idle":
        print(
            f"{r['opened']} of {r['requested']} sessions logged in ({r['open_s']} s), "
            f"{r['alive_after_noop']} answered a NOOP, VmRSS {r['rss_before_kib']} -> "
            f"{r['rss_loaded_kib']} -> {r['rss_closed_kib']} KiB (closed), "
            f"{r['kib_per_session']} KiB per session"
            f"{' ' + str(r['errors']) if r['errors'] else ''}"
        )
    else:
        print(json.dumps(r))


# ---- command line ---------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def client_args(p):
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, default=21)
        p.add_argument("--user", default="ftptest")
        p.add_argument("--password", default="ftptest")
        p.add_argument("--timeout", type=float, default=10.0, help="per step, seconds")
        p.add_argument("--deadline", type=float, default=120.0, help="whole run, seconds")
        p.add_argument("--label", action="append", help="key=value copied into the output")

    p = sub.add_parser("sessions")
    client_args(p)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--file", default="small.bin")
    p.add_argument("--expect-size", type=int)
    p.add_argument("--pasv", action="store_true", help="PASV instead of EPSV")

    p = sub.add_parser("rtt")
    client_args(p)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=20)

    p = sub.add_parser("idle-server")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, default=21)
    p.add_argument("--idle-timeout", type=float, default=900.0)
    p.add_argument("--lifetime", type=float, default=7200.0, help="exit after this many seconds")

    p = sub.add_parser("idle-clients")
    client_args(p)
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--pid", type=int, required=True, help="process whose VmRSS is read")
    p.add_argument("--open-concurrency", type=int, default=200)
    p.add_argument("--settle", type=float, default=2.0, help="seconds before reading VmRSS")

    p = sub.add_parser("report")
    p.add_argument("log")

    sub.add_parser("summary")

    args = ap.parse_args()
    if args.cmd == "sessions":
        emit(args, asyncio.run(sessions_main(args)))
    elif args.cmd == "rtt":
        emit(args, rtt_main(args))
    elif args.cmd == "idle-server":
        asyncio.run(idle_server_main(args))
    elif args.cmd == "idle-clients":
        emit(args, asyncio.run(idle_clients_main(args)))
    elif args.cmd == "report":
        report_main(args)
    elif args.cmd == "summary":
        summary_main()


if __name__ == "__main__":
    sys.exit(main())
