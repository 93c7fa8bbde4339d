#!/usr/bin/python3
"""FTPS download with Python's ftplib.FTP_TLS (explicit TLS, PROT P).

  ftps_client.py HOST PORT CAFILE OUTFILE [--active] [--file data.bin]
                 [--no-prot-p] [--bounce HOST:PORT] [--pasv-hold SECONDS]

FTP_TLS does not resume the control connection's TLS session on data
connections; servers that demand it (vsftpd require_ssl_reuse, proftpd's
default) refuse such transfers, so this uses the usual small subclass that
passes the control session to the data connection's handshake. Prints
`RESULT ok <sha256> <bytes> reused=<bool>`, or `RESULT failed <error>`
(exit 1). --no-prot-p skips PROT P. --bounce sends PORT naming that
target after login and prints `RESULT reply <reply>`. --pasv-hold sends
PASV, prints `PASV <port>`, waits SECONDS and quits (`RESULT held`).
"""
import argparse
import hashlib
import ftplib
import ssl
import sys


class ReusingFTP_TLS(ftplib.FTP_TLS):
    reused = None

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(
                conn, server_hostname=self.host, session=self.sock.session
            )
            self.reused = conn.session_reused
        return conn, size


p = argparse.ArgumentParser()
p.add_argument("host")
p.add_argument("port", type=int)
p.add_argument("cafile")
p.add_argument("out")
p.add_argument("--active", action="store_true")
p.add_argument("--file", default="data.bin")
p.add_argument("--no-prot-p", action="store_true")
p.add_argument("--bounce")
p.add_argument("--pasv-hold", type=float)
a = p.parse_args()

ctx = ssl.create_default_context(cafile=a.cafile)
try:
    ftp = ReusingFTP_TLS(context=ctx, timeout=20)
    ftp.connect(a.host, a.port)
    ftp.auth()
    ftp.login("ftptest", "ftptest")
    if not a.no_prot_p:
        ftp.prot_p()
    if a.bounce:
        host, port = a.bounce.rsplit(":", 1)
        arg = ",".join(host.split(".") + [str(int(port) >> 8), str(int(port) & 255)])
        try:
            reply = ftp.sendcmd("PORT " + arg)
        except ftplib.Error as e:
            reply = str(e)
        print("RESULT reply", reply)
        sys.exit(0)
    if a.pasv_hold:
        import time
        reply = ftp.sendcmd("PASV")
        port = ftplib.parse227(reply)[1]
        print("PASV", port, flush=True)
        time.sleep(a.pasv_hold)
        ftp.quit()
        print("RESULT held")
        sys.exit(0)
    ftp.set_pasv(not a.active)
    h = hashlib.sha256()
    n = 0
    with open(a.out, "wb") as f:
        def block(b):
            global n
            n += len(b)
            h.update(b)
            f.write(b)
        ftp.retrbinary("RETR " + a.file, block)
    ftp.quit()
except Exception as e:  # noqa: BLE001 - the test reads the line
    print("RESULT failed", repr(e))
    sys.exit(1)
print("RESULT ok", h.hexdigest(), n, "reused=%s" % ftp.reused)
