#!/bin/sh
# with-devlog.sh SOCKET CMD...: runs CMD with /dev/log leading to SOCKET
# (a Unix datagram socket, tests/lab/syslog.py), for pure-ftpd, which logs
# only through syslog(3) while the lab machine runs no syslog daemon and
# /dev/log is one path for the whole machine.
#
# Must run in a mount namespace of its own that is a slave of the root one
# (`ip netns exec` makes one; `unshare --mount --propagation slave` too):
# /dev there becomes a small tmpfs with the character devices a daemon
# opens and the /dev/log symlink; the machine's /dev is untouched.
set -eu
sock=$1
shift
mount -t tmpfs -o size=64k,mode=755 fglab-dev /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
ln -s "$sock" /dev/log
exec "$@"
