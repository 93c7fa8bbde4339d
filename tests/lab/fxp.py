#!/usr/bin/env python3
"""Server-to-server (FXP) transfer driven by one client over two control
connections.

usage: fxp.py SRC_HOST DST_HOST FILE DEST_NAME [--port 21] [--src-port P]
              [--dst-port P] [--user ftptest] [--password ftptest]
              [--epsv] [--timeout 20]

Logs into both servers, then:
  DST: PASV            -> 227 (h1,h2,h3,h4,p1,p2)   (parsed with ftplib.parse227)
  SRC: PORT h1,h2,h3,h4,p1,p2                        (exactly that address)
  DST: STOR DEST_NAME                                (sent, reply not awaited yet)
  SRC: RETR FILE                                     (SRC connects to DST and sends)
  150/125 from SRC, then from DST (a passive server sends its 150 only once
  the data connection has arrived, so waiting for DST's 150 before sending
  RETR would deadlock), then 226 from SRC and from DST, and SIZE on both as
  a cross-check.
With --epsv: EPSV to DST and EPRT |af|DST_HOST|port| to SRC instead.

Output: one "fxp: ..." line per step and a final line
  RESULT ok | RESULT refused STEP <reply> | RESULT failed STEP <error>
Exit status: 0 ok, 2 a command was refused (4xx/5xx reply, e.g. a gateway's
policy refusing the PORT), 1 any other failure (timeout, connection error,
size mismatch). A hard deadline (--timeout, default 20 s) bounds the whole run.
"""
import argparse
import ftplib
import ipaddress
import signal
import socket
import sys


class Refused(Exception):
    def __init__(self, step, reply):
        super().__init__(f"{step}: {reply}")
        self.step = step
        self.reply = reply


class Failed(Exception):
    def __init__(self, step, err):
        super().__init__(f"{step}: {err}")
        self.step = step
        self.err = err


def say(msg):
    print(f"fxp: {msg}", flush=True)


def step(name, fn, *args):
    """Run one FTP operation; classify errors by step name."""
    try:
        return fn(*args)
    except (ftplib.error_temp, ftplib.error_perm) as e:
        raise Refused(name, str(e).strip()) from None
    except ftplib.error_reply as e:
        raise Failed(name, f"unexpected reply {str(e).strip()}") from None
    except (OSError, EOFError, ftplib.Error) as e:
        raise Failed(name, f"{type(e).__name__}: {e}") from None


def expect_prelim(name, resp):
    if not resp.startswith("1"):
        raise Failed(name, f"expected 150/125, got {resp.strip()}")
    return resp


def connect(label, host, port, user, password, timeout):
    def do():
        ftp = ftplib.FTP(timeout=timeout)
        ftp.connect(host, port)
        return ftp

    ftp = step(f"{label} connect", do)
    say(f"{label} {host}:{port} greeting: {ftp.welcome.splitlines()[-1] if ftp.welcome else ''}")
    step(f"{label} login", ftp.login, user, password)
    say(f"{label} logged in as {user}")
    step(f"{label} TYPE I", ftp.voidcmd, "TYPE I")
    return ftp


def on_alarm(signum, frame):
    raise TimeoutError("overall deadline reached")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("file")
    ap.add_argument("dest_name")
    ap.add_argument("--port", type=int, default=21)
    ap.add_argument("--src-port", type=int)
    ap.add_argument("--dst-port", type=int)
    ap.add_argument("--user", default="ftptest")
    ap.add_argument("--password", default="ftptest")
    ap.add_argument("--epsv", action="store_true", help="use EPSV/EPRT instead of PASV/PORT")
    ap.add_argument("--timeout", type=float, default=20.0, help="overall deadline in seconds")
    args = ap.parse_args()

    src_port = args.src_port or args.port
    dst_port = args.dst_port or args.port
    sock_timeout = max(2.0, min(10.0, args.timeout / 2))

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)

    src = dst = None
    status = 1
    try:
        src = connect("SRC", args.src, src_port, args.user, args.password, sock_timeout)
        dst = connect("DST", args.dst, dst_port, args.user, args.password, sock_timeout)

        if args.epsv:
            resp = step("DST EPSV", dst.sendcmd, "EPSV")
            say(f"DST EPSV -> {resp.strip()}")
            try:
                port = ftplib.parse229(resp, (args.dst, dst_port))[1]
            except ftplib.Error as e:
                raise Failed("DST EPSV", f"unparsable reply: {e}") from None
            af = 2 if ipaddress.ip_address(args.dst.strip("[]")).version == 6 else 1
            cmd = f"EPRT |{af}|{args.dst.strip('[]')}|{port}|"
        else:
            resp = step("DST PASV", dst.sendcmd, "PASV")
            say(f"DST PASV -> {resp.strip()}")
            try:
                host, port = ftplib.parse227(resp)
            except ftplib.Error as e:
                raise Failed("DST PASV", f"unparsable reply: {e}") from None
            cmd = "PORT " + ",".join(host.split(".") + [str(port >> 8), str(port & 0xFF)])
        say(f"SRC {cmd}")
        resp = step(f"SRC {cmd.split()[0]}", src.sendcmd, cmd)
        say(f"SRC {cmd.split()[0]} -> {resp.strip()}")

        # A passive server answers STOR with 150 only once its data connection
        # has been accepted, and the active server connects only after RETR:
        # so send STOR, then RETR, and only then read the preliminary replies.
        step("DST STOR", dst.putcmd, f"STOR {args.dest_name}")
        say(f"DST STOR {args.dest_name} sent")
        step("SRC RETR", src.putcmd, f"RETR {args.file}")
        say(f"SRC RETR {args.file} sent")
        resp = expect_prelim("SRC RETR", step("SRC RETR", src.getresp))
        say(f"SRC RETR -> {resp.strip()}")
        resp = expect_prelim("DST STOR", step("DST STOR", dst.getresp))
        say(f"DST STOR -> {resp.strip()}")

        resp = step("SRC transfer", src.voidresp)
        say(f"SRC done -> {resp.strip()}")
        resp = step("DST transfer", dst.voidresp)
        say(f"DST done -> {resp.strip()}")

        # cross-check sizes (SIZE is optional: a refusal is only reported)
        sizes = []
        for label, ftp, name in (("SRC", src, args.file), ("DST", dst, args.dest_name)):
            try:
                sizes.append(ftp.size(name))
                say(f"{label} SIZE {name} = {sizes[-1]}")
            except (ftplib.Error, OSError, EOFError) as e:
                say(f"{label} SIZE {name} unavailable: {str(e).strip()}")
                sizes.append(None)
        if None not in sizes and sizes[0] != sizes[1]:
            raise Failed("verify", f"size mismatch: SRC {sizes[0]} != DST {sizes[1]}")
        print("RESULT ok", flush=True)
        status = 0
    except Refused as e:
        print(f"RESULT refused {e.step} {e.reply}", flush=True)
        status = 2
    except Failed as e:
        print(f"RESULT failed {e.step} {e.err}", flush=True)
        status = 1
    except TimeoutError as e:
        print(f"RESULT failed deadline {e}", flush=True)
        status = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for ftp in (src, dst):
            if ftp is None:
                continue
            try:
                ftp.sock.settimeout(1) if ftp.sock else None
                ftp.quit()
            except Exception:
                try:
                    ftp.close()
                except Exception:
                    pass
    return status


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    sys.exit(main())
