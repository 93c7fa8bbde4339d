#!/usr/bin/python3
"""A real FTP server (Debian's python3-pyftpdlib) for the loopback tests.

Serves DIR to user `ftptest`/`ftptest` with write permission on HOST, an
ephemeral port, and prints `PORT <n>` on stdout once it listens.
--masquerade makes it announce that address in 227 replies, as a server
behind NAT does. --throttle limits each download to that many bytes per
second (a transfer that is still running when the client aborts it).
"""
import argparse
import logging
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
from pyftpdlib.servers import FTPServer

p = argparse.ArgumentParser()
p.add_argument("--dir", required=True)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--masquerade")
p.add_argument("--log")
p.add_argument("--throttle", type=int)
a = p.parse_args()

if a.log:
    logging.basicConfig(filename=a.log, level=logging.DEBUG)
auth = DummyAuthorizer()
auth.add_user("ftptest", "ftptest", a.dir, perm="elradfmwMT")
handler = FTPHandler
handler.authorizer = auth
handler.passive_ports = range(41000, 41500)
if a.throttle:
    ThrottledDTPHandler.write_limit = a.throttle
    handler.dtp_handler = ThrottledDTPHandler
if a.masquerade:
    handler.masquerade_address = a.masquerade
server = FTPServer((a.host, 0), handler)
print("PORT", server.socket.getsockname()[1], flush=True)
sys.stdout.close()
server.serve_forever()
