#!/usr/bin/python3
"""Drives a classic command-line FTP client (inetutils-ftp, tnftp) under a
pseudo-terminal the way a person does: log in, start a download, press ^C
while it runs, then check that the client is usable again.

The classic clients abort a transfer on SIGINT with RFC 959 section 4.1.3's
sequence: Telnet IP, a Synch sent as TCP urgent data (RFC 854), then ABOR.
^C is typed on the terminal (the line discipline turns it into SIGINT for
the client), so nothing here knows how the client aborts.

Prints one JSON object on stdout:
  interrupted       ^C was typed while hash marks were arriving
  prompt_after      seconds from ^C to the next `ftp> ` prompt (null: none
                    within --abort-within)
  after_interrupt   the reply codes the client printed between ^C and that
                    prompt, in order
  pwd, ls           the commands after the abort worked (257; a listing
                    that names --file and a 226)
  quit              221 and the client exited
  error             what went wrong first, or null
The whole terminal transcript goes to --transcript.
"""
import argparse
import json
import os
import pty
import re
import select
import signal
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--client", required=True)
p.add_argument("--host", required=True)
p.add_argument("--port", default="21")
p.add_argument("--user", default="ftptest")
p.add_argument("--password", default="ftptest")
p.add_argument("--file", required=True)
p.add_argument("--mode", choices=["passive", "active"], default="passive")
p.add_argument("--abort-within", type=float, default=15.0)
p.add_argument("--transcript", required=True)
a = p.parse_args()

PROMPT = b"ftp> "
REPLY = re.compile(rb"^(\d{3})[ -]", re.M)

# -n: no auto-login; -e: no line editing (no escape sequences); -p/-A:
# passive or active data connections. Both clients take all three.
argv = [a.client, "-n", "-e", "-p" if a.mode == "passive" else "-A"]
env = dict(os.environ, TERM="dumb", LC_ALL="C")

pid, fd = pty.fork()
if pid == 0:
    try:
        os.execvpe(a.client, argv, env)
    finally:
        os._exit(127)

out = bytearray()
result = {
    "client": os.path.basename(a.client),
    "mode": a.mode,
    "interrupted": False,
    "prompt_after": None,
    "after_interrupt": [],
    "pwd": False,
    "ls": False,
    "quit": False,
    "error": None,
}


class Failed(Exception):
    pass


def read_some(deadline):
    """Reads what the terminal has until `deadline`; False at EOF."""
    left = deadline - time.monotonic()
    if left <= 0:
        return True
    r, _, _ = select.select([fd], [], [], min(left, 0.2))
    if not r:
        return True
    try:
        data = os.read(fd, 65536)
    except OSError:
        return False
    if not data:
        return False
    out.extend(data)
    return True


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise Failed(f"timed out after {timeout}s waiting for {what}")
        if not read_some(deadline):
            if pred():
                return
            raise Failed(f"client exited while waiting for {what}")


def prompt_after(mark):
    return out.find(PROMPT, mark) >= 0


def command(line, timeout=15.0):
    """Types `line` and returns what the client printed up to its next prompt."""
    mark = len(out)
    os.write(fd, line.encode() + b"\n")
    wait_for(lambda: prompt_after(mark + len(line)), timeout, f"the prompt after {line!r}")
    end = out.find(PROMPT, mark + len(line))
    return bytes(out[mark:end])


def codes(text):
    return [m.decode() for m in REPLY.findall(text)]


try:
    wait_for(lambda: prompt_after(0), 10, "the first prompt")
    said = command(f"open {a.host} {a.port}")
    if "220" not in codes(said):
        raise Failed(f"no 220 greeting: {said!r}")
    said = command(f"user {a.user} {a.password}")
    if "230" not in codes(said):
        raise Failed(f"login failed: {said!r}")
    command("binary")
    command("hash")
    # The download runs until ^C: hash marks show that data is flowing.
    mark = len(out)
    os.write(fd, f"get {a.file} /dev/null\n".encode())
    wait_for(lambda: out.count(b"#", mark) >= 64, 20, "hash marks of the download")
    time.sleep(0.3)
    if prompt_after(mark):
        raise Failed("the download ended before it could be interrupted")
    interrupt_at = len(out)
    os.write(fd, b"\x03")
    started = time.monotonic()
    result["interrupted"] = True
    try:
        wait_for(lambda: prompt_after(interrupt_at), a.abort_within, "the prompt after ^C")
    except Failed as e:
        result["after_interrupt"] = codes(bytes(out[interrupt_at:]))
        raise
    result["prompt_after"] = round(time.monotonic() - started, 3)
    end = out.find(PROMPT, interrupt_at)
    result["after_interrupt"] = codes(bytes(out[interrupt_at:end]))
    command("hash")
    said = command("pwd")
    # tnftp prints a 257 as "Remote directory: ...".
    result["pwd"] = "257" in codes(said) or b"Remote directory: " in said
    said = command("ls", timeout=20)
    result["ls"] = "226" in codes(said) and a.file.encode() in said
    mark = len(out)
    os.write(fd, b"quit\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read_some(deadline):
        pass
    result["quit"] = "221" in codes(bytes(out[mark:]))
except Failed as e:
    result["error"] = str(e)
finally:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    with open(a.transcript, "wb") as t:
        t.write(bytes(out))

print(json.dumps(result), flush=True)
sys.exit(0)
