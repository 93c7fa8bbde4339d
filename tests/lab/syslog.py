#!/usr/bin/env python3
"""A syslog receiver for the lab's pure-ftpd, which logs only through
syslog(3) (its `-d -d` logs every command and reply).

Binds a Unix datagram socket (what glibc's syslog() sends to as /dev/log)
and appends each message to the log file, one line each, flushed at once:

    <unix-time> <message as received, e.g. "<31>pure-ftpd: (ftptest@...) [DEBUG] Command [abor] []">

usage: syslog.py --socket PATH --log FILE
"""
import argparse
import os
import socket
import time

p = argparse.ArgumentParser()
p.add_argument("--socket", required=True)
p.add_argument("--log", required=True)
a = p.parse_args()

try:
    os.unlink(a.socket)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(a.socket)
# pure-ftpd's sessions run as the lab user after login; they keep the
# connection their parent opened, but a reconnect must be allowed too.
os.chmod(a.socket, 0o666)
with open(a.log, "a", encoding="utf-8", errors="replace") as out:
    while True:
        msg = s.recv(65536).decode("utf-8", "replace").rstrip("\0\n")
        out.write(f"{time.time():.3f} {msg}\n")
        out.flush()
