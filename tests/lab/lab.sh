#!/usr/bin/env bash
# ftpgate integration lab: network namespaces, bridges, nftables and FTP servers.
#
#   lab.sh up               build the topology (tears leftovers down first)
#   lab.sh down             tear everything down (safe when half-built)
#   lab.sh start-servers    (re)start vsftpd on srv1, proftpd on srv2,
#                           pure-ftpd on srv3, the connection recorder on out3
#   lab.sh stop-servers     stop them
#   lab.sh exec NS CMD...   run CMD inside namespace NS (gw, in1, in2, srv1,
#                           srv2, srv3, out3, or a full namespace name)
#   lab.sh forward allow|drop|status
#                           gw forward policy (drop is the lab's normal state;
#                           allow only for proxy-less sanity checks)
#   lab.sh status           show what is up
#   lab.sh env              print the lab's variables (shell syntax)
#
# Environment:
#   FG_PREFIX       namespace name prefix (default "fg-")
#   FG_STATE        state dir (default /tmp/fglab for prefix "fg-",
#                   /tmp/fglab-<prefix> otherwise)
#   FG_KEEP_STATE=1 `down` keeps the state dir (logs) instead of removing it
#   FG_PROFTPD      proftpd binary (default: the copy unpacked by
#                   scripts/install-test-deps, else proftpd on PATH)
#   FG_PUREFTPD_ROOT  where pure-ftpd is unpacked (default
#                   /opt/ftpgate-lab/pure-ftpd, by scripts/install-test-deps)
#   FG_DATA_SIZE    size in bytes of data.bin (default 3145728 = 3 MiB)
#   FG_OUT3_PORT    port of the connection recorder on out3 (default 2525)
#   FG_PASV_MIN / FG_PASV_MAX  servers' passive port range (40000-40100)
#   FG_TLS=1        start-servers: FTPS only (vsftpd ssl_enable, require_ssl_reuse,
#                   force_local_logins_ssl, and implicit FTPS on port 990; proftpd
#                   mod_tls TLSRequired), with a
#                   CA and certificates made in $FG_STATE/tls (see README.md)
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

P=${FG_PREFIX:-fg-}
if [ -n "${FG_STATE:-}" ]; then
  STATE=$FG_STATE
elif [ "$P" = "fg-" ]; then
  STATE=/tmp/fglab
else
  STATE=/tmp/fglab-${P%-}
fi
DATA_SIZE=${FG_DATA_SIZE:-3145728}
OUT3_PORT=${FG_OUT3_PORT:-2525}
PASV_MIN=${FG_PASV_MIN:-40000}
PASV_MAX=${FG_PASV_MAX:-40100}
FTP_USER=ftptest
FTP_PASS=ftptest

NS_GW=${P}gw
# short name | bridge | IPv4 | IPv6   (gateway: 192.0.2.1 / 2001:db8:1::1 inside,
#                                      198.51.100.1 / 2001:db8:2::1 outside)
HOSTS=(
  "in1  in  192.0.2.10    2001:db8:1::10"
  "in2  in  192.0.2.11    2001:db8:1::11"
  "srv1 out 198.51.100.20 2001:db8:2::20"
  "srv2 out 198.51.100.21 2001:db8:2::21"
  "srv3 out 198.51.100.22 2001:db8:2::22"
  "out3 out 198.51.100.30 2001:db8:2::30"
)
GW_IN4=192.0.2.1
GW_IN6=2001:db8:1::1
GW_OUT4=198.51.100.1
GW_OUT6=2001:db8:2::1

PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)

log() { echo "lab[$P]: $*"; }
die() { echo "lab[$P]: error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

all_ns() {
  local h name
  echo "$NS_GW"
  for h in "${HOSTS[@]}"; do
    read -r name _ <<<"$h"
    echo "$P$name"
  done
}

ns_exists() { [ -e "/run/netns/$1" ]; }

# Map a short name (gw, in1, ...) to the namespace name.
ns_name() {
  local n=$1
  if ns_exists "$P$n"; then echo "$P$n"; elif ns_exists "$n"; then echo "$n"; else echo "$P$n"; fi
}

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

sysctl_ns() {
  # sysctl_ns NS key=value...  (ignores keys that do not exist)
  local ns=$1 kv key; shift
  for kv in "$@"; do
    key=${kv%%=*}
    if nsx "$ns" test -e "/proc/sys/${key//.//}"; then
      nsx "$ns" sysctl -qw "$kv" >/dev/null
    fi
  done
}

ns_pids() {
  ip netns pids "$1" 2>/dev/null | grep -vxE "$$|${BASHPID:-$$}" || true
}

# Kill every process inside a namespace: TERM, then KILL after a grace period.
kill_ns_procs() {
  local ns=$1 sig _
  local -a pids
  ns_exists "$ns" || return 0
  for sig in TERM KILL; do
    mapfile -t pids < <(ns_pids "$ns")
    [ "${#pids[@]}" -gt 0 ] || return 0
    log "sending SIG$sig to processes in $ns: ${pids[*]}"
    kill "-$sig" "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 30); do
      mapfile -t pids < <(ns_pids "$ns")
      [ "${#pids[@]}" -gt 0 ] || return 0
      sleep 0.1
    done
  done
  echo "lab[$P]: warning: processes still in $ns: ${pids[*]}" >&2
}

safe_rm_state() {
  case "$STATE" in
    ""|/|/tmp|/tmp/|/root|/home|/usr*|/etc*|/var|/var/) die "refusing to remove state dir '$STATE'" ;;
  esac
  if [ -d "$STATE" ]; then
    if [ -e "$STATE/.fglab" ]; then
      rm -rf -- "$STATE"
    else
      die "state dir $STATE exists but was not made by lab.sh (no .fglab marker); remove it or set FG_STATE"
    fi
  fi
}

cmd_down() {
  need_root
  local ns
  log "tearing down"
  # hosts first, then the gateway (its bridges go with it)
  for ns in $(all_ns | tac); do
    if ns_exists "$ns"; then
      kill_ns_procs "$ns"
      log "deleting namespace $ns"
      ip netns del "$ns" 2>/dev/null || rm -f "/run/netns/$ns"
    fi
  done
  if [ "${FG_KEEP_STATE:-0}" = 1 ]; then
    [ -d "$STATE" ] && log "keeping state dir $STATE"
  else
    safe_rm_state
  fi
  log "down"
}

cmd_up() {
  need_root
  local h name side v4 v6 ns peer tool
  for tool in ip nft sysctl; do
    command -v "$tool" >/dev/null || die "$tool missing: run scripts/install-test-deps"
  done
  # a previous run may have been killed half-way
  FG_KEEP_STATE=0 cmd_down
  log "building lab (state dir $STATE)"
  mkdir -p "$STATE"
  chmod 755 "$STATE"
  touch "$STATE/.fglab"

  for ns in $(all_ns); do
    log "creating namespace $ns"
    ip netns add "$ns"
    # IPv6 usable at once: no duplicate address detection anywhere
    sysctl_ns "$ns" net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
      net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
      net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
    ip -n "$ns" link set lo up
  done

  log "gateway $NS_GW: bridges br-in/br-out, forwarding on, nft forward policy drop"
  sysctl_ns "$NS_GW" net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv6.conf.default.forwarding=1
  # If br_netfilter is loaded, bridged frames (in1<->in2, srv1<->srv2) would
  # go through the inet forward chain and be dropped: keep bridging plain L2.
  sysctl_ns "$NS_GW" net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 \
    net.bridge.bridge-nf-call-arptables=0
  ip -n "$NS_GW" link add br-in type bridge stp_state 0 forward_delay 0 mcast_snooping 0
  ip -n "$NS_GW" link add br-out type bridge stp_state 0 forward_delay 0 mcast_snooping 0
  ip -n "$NS_GW" addr add "$GW_IN4/24" dev br-in
  ip -n "$NS_GW" addr add "$GW_IN6/64" dev br-in nodad
  ip -n "$NS_GW" addr add "$GW_OUT4/24" dev br-out
  ip -n "$NS_GW" addr add "$GW_OUT6/64" dev br-out nodad
  ip -n "$NS_GW" link set br-in up
  ip -n "$NS_GW" link set br-out up
  nsx "$NS_GW" nft -f - <<'EOF'
table inet fglab {
	chain forward {
		type filter hook forward priority filter; policy drop;
	}
}
EOF

  for h in "${HOSTS[@]}"; do
    read -r name side v4 v6 <<<"$h"
    ns=$P$name
    peer=v-$name
    log "host $ns: $v4 $v6 on br-$side"
    ip -n "$NS_GW" link add "$peer" type veth peer name eth0 netns "$ns"
    sysctl_ns "$NS_GW" "net.ipv6.conf.$peer.disable_ipv6=1"
    ip -n "$NS_GW" link set "$peer" master "br-$side"
    ip -n "$NS_GW" link set "$peer" up
    ip -n "$ns" addr add "$v4/24" dev eth0
    ip -n "$ns" addr add "$v6/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up
    if [ "$side" = in ]; then
      ip -n "$ns" route add default via "$GW_IN4"
      ip -n "$ns" -6 route add default via "$GW_IN6"
    else
      ip -n "$ns" route add default via "$GW_OUT4"
      ip -n "$ns" -6 route add default via "$GW_OUT6"
    fi
  done

  write_env
  check_links
  log "up (namespaces: $(all_ns | tr '\n' ' '))"
}

write_env() {
  cat >"$STATE/lab.env" <<EOF
# written by tests/lab/lab.sh up
FG_PREFIX=$P
FG_STATE=$STATE
NS_GW=$NS_GW
NS_IN1=${P}in1
NS_IN2=${P}in2
NS_SRV1=${P}srv1
NS_SRV2=${P}srv2
NS_SRV3=${P}srv3
NS_OUT3=${P}out3
GW_IN4=$GW_IN4
GW_IN6=$GW_IN6
GW_OUT4=$GW_OUT4
GW_OUT6=$GW_OUT6
IN1_4=192.0.2.10
IN1_6=2001:db8:1::10
IN2_4=192.0.2.11
IN2_6=2001:db8:1::11
SRV1_4=198.51.100.20
SRV1_6=2001:db8:2::20
SRV2_4=198.51.100.21
SRV2_6=2001:db8:2::21
SRV3_4=198.51.100.22
SRV3_6=2001:db8:2::22
OUT3_4=198.51.100.30
OUT3_6=2001:db8:2::30
OUT3_PORT=$OUT3_PORT
OUT3_LOG=$STATE/out3/connections.log
FTP_USER=$FTP_USER
FTP_PASS=$FTP_PASS
PASV_MIN=$PASV_MIN
PASV_MAX=$PASV_MAX
SRV1_ROOT=$STATE/srv1/root
SRV2_ROOT=$STATE/srv2/root
SRV3_ROOT=$STATE/srv3/root
EOF
}

# Each host must reach its side of the gateway over IPv4 and IPv6.
check_links() {
  local h name side v4 v6 gw4 gw6 fail=0
  for h in "${HOSTS[@]}"; do
    read -r name side v4 v6 <<<"$h"
    if [ "$side" = in ]; then gw4=$GW_IN4 gw6=$GW_IN6; else gw4=$GW_OUT4 gw6=$GW_OUT6; fi
    if ! nsx "$P$name" ping -q -c 1 -W 2 "$gw4" >/dev/null 2>&1; then
      echo "lab[$P]: $P$name cannot ping $gw4" >&2; fail=1
    fi
    if ! nsx "$P$name" ping -q -6 -c 1 -W 2 "$gw6" >/dev/null 2>&1; then
      echo "lab[$P]: $P$name cannot ping $gw6" >&2; fail=1
    fi
  done
  [ "$fail" = 0 ] || die "link check failed"
  log "links ok (every host pings the gateway over IPv4 and IPv6)"
}

require_up() {
  local ns
  for ns in $(all_ns); do
    ns_exists "$ns" || die "namespace $ns missing: run '$0 up' first"
  done
  [ -e "$STATE/.fglab" ] || die "state dir $STATE missing: run '$0 up' first"
}

find_proftpd() {
  if [ -n "${FG_PROFTPD:-}" ]; then
    echo "$FG_PROFTPD"
  elif [ -x /opt/ftpgate-lab/proftpd/usr/sbin/proftpd ]; then
    echo /opt/ftpgate-lab/proftpd/usr/sbin/proftpd
  elif command -v proftpd >/dev/null; then
    command -v proftpd
  else
    die "proftpd not found: run scripts/install-test-deps"
  fi
}

find_pureftpd_root() {
  local root=${FG_PUREFTPD_ROOT:-/opt/ftpgate-lab/pure-ftpd}
  [ -x "$root/usr/sbin/pure-ftpd" ] && [ -x "$root/usr/bin/pure-pw" ] ||
    die "pure-ftpd not found in $root: run scripts/install-test-deps"
  echo "$root"
}

ensure_user() {
  # Home "/": vsftpd chdirs to the home directory before local_root; both
  # servers chroot the user into its server root anyway.
  if ! id "$FTP_USER" >/dev/null 2>&1; then
    log "creating system user $FTP_USER"
    useradd --system --no-create-home --home-dir / \
      --shell /bin/sh --comment "ftpgate lab FTP user" "$FTP_USER"
  elif [ "$(getent passwd "$FTP_USER" | cut -d: -f6)" != / ]; then
    usermod --home / "$FTP_USER"
  fi
  echo "$FTP_USER:$FTP_PASS" | chpasswd
  if [ -f /etc/ftpusers ] && grep -qx "$FTP_USER" /etc/ftpusers; then
    die "$FTP_USER is listed in /etc/ftpusers (denied by PAM)"
  fi
}

# Server root: data.bin (random, DATA_SIZE bytes, read-only for the user) and
# data.bin.sha256; everything else (earlier uploads) is removed.
prepare_root() {
  local root=$1
  mkdir -p "$root"
  find "$root" -mindepth 1 -maxdepth 1 ! -name data.bin ! -name data.bin.sha256 -exec rm -rf {} +
  if ! [ -f "$root/data.bin" ] || [ "$(stat -c %s "$root/data.bin")" != "$DATA_SIZE" ] ||
    ! (cd "$root" && sha256sum --status -c data.bin.sha256 2>/dev/null); then
    log "generating $root/data.bin ($DATA_SIZE random bytes)"
    head -c "$DATA_SIZE" /dev/urandom >"$root/data.bin"
    (cd "$root" && sha256sum data.bin >data.bin.sha256)
  fi
  chown root:root "$root/data.bin" "$root/data.bin.sha256"
  chmod 644 "$root/data.bin" "$root/data.bin.sha256"
  chown "$FTP_USER:" "$root"
  chmod 755 "$root"
}

# Start a foreground daemon in a namespace, detached (own session, stdio to
# files), and record its pid.
start_daemon() {
  local ns=$1 pidfile=$2 out=$3; shift 3
  setsid ip netns exec "$ns" "$@" </dev/null >>"$out" 2>&1 &
  echo $! >"$pidfile"
}

# wait_listen NS PORT NAME: until something listens on PORT in NS (10 s)
wait_listen() {
  local ns=$1 port=$2 name=$3 _
  for _ in $(seq 1 100); do
    if nsx "$ns" ss -Hltn "sport = :$port" | grep -q .; then return 0; fi
    sleep 0.1
  done
  die "$name did not start listening on port $port in $ns (see logs in $STATE)"
}

# wait_file PATH NAME: until PATH exists (10 s)
wait_file() {
  local path=$1 name=$2 _
  for _ in $(seq 1 100); do
    [ -e "$path" ] && return 0
    sleep 0.1
  done
  die "$name did not create $path (see logs in $STATE)"
}

# wait_banner NS HOST: an FTP 220 greeting on HOST:21 from inside NS
wait_banner() {
  local ns=$1 host=$2
  nsx "$ns" "$PYTHON" - "$host" <<'EOF' || die "no 220 greeting from $host"
import socket, sys, time
host = sys.argv[1]
deadline = time.time() + 10
while True:
    try:
        with socket.create_connection((host, 21), timeout=2) as s:
            s.settimeout(3)
            line = s.makefile("rb").readline().decode("latin-1").rstrip()
            if line.startswith("220"):
                print(f"  {host}: {line}")
                s.sendall(b"QUIT\r\n")
                sys.exit(0)
            print(f"  {host}: unexpected greeting {line!r}", file=sys.stderr)
    except OSError as e:
        if time.time() > deadline:
            print(f"  {host}: {e}", file=sys.stderr)
            sys.exit(1)
    time.sleep(0.2)
EOF
}

# make_certs: a lab CA, the servers' certificate (their addresses as
# subject alternative names), the gateway's (its inside address) and a
# second CA that signed none of them (a wrong upstream_ca), in $STATE/tls.
make_certs() {
  local t=$STATE/tls
  [ -f "$t/server.pem" ] && [ -f "$t/gw.pem" ] && [ -f "$t/other-ca.pem" ] && return 0
  command -v openssl >/dev/null || die "openssl missing: run scripts/install-test-deps"
  mkdir -p "$t"
  log "making lab certificates in $t"
  local ca
  for ca in ca other-ca; do
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=fglab $ca" \
      -keyout "$t/$ca.key" -out "$t/$ca.pem" >/dev/null 2>&1 || die "openssl: $ca"
  done
  sign() {
    local name=$1 san=$2
    openssl req -newkey rsa:2048 -nodes -subj "/CN=fglab $name" \
      -keyout "$t/$name.key" -out "$t/$name.csr" >/dev/null 2>&1 || die "openssl: $name request"
    printf 'subjectAltName=%s\n' "$san" >"$t/$name.ext"
    openssl x509 -req -in "$t/$name.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
      -days 30 -extfile "$t/$name.ext" -out "$t/$name.pem" >/dev/null 2>&1 || die "openssl: $name"
  }
  sign server "IP:198.51.100.20,IP:198.51.100.21,IP:2001:db8:2::20,IP:2001:db8:2::21,DNS:srv1.fglab,DNS:srv2.fglab"
  sign gw "IP:$GW_IN4,IP:$GW_IN6,DNS:gw.fglab"
  chmod 644 "$t"/*.pem "$t"/*.key
}

vsftpd_tls_conf() {
  [ "${FG_TLS:-0}" = 1 ] || { echo "ssl_enable=NO"; return; }
  cat <<EOF
ssl_enable=YES
rsa_cert_file=$STATE/tls/server.pem
rsa_private_key_file=$STATE/tls/server.key
# what FTPS servers demand: TLS logins and data, and data connections that
# resume the control connection's TLS session
force_local_logins_ssl=YES
force_local_data_ssl=YES
require_ssl_reuse=YES
ssl_ciphers=HIGH
EOF
}

proftpd_tls_conf() {
  [ "${FG_TLS:-0}" = 1 ] || return 0
  local modules
  modules=$(dirname "$(dirname "$(find_proftpd)")")/lib/proftpd
  cat <<EOF
ModulePath            $modules
LoadModule            mod_tls.c
TLSEngine             on
TLSRequired           on
TLSProtocol           TLSv1.2 TLSv1.3
TLSRSACertificateFile $STATE/tls/server.pem
TLSRSACertificateKeyFile $STATE/tls/server.key
TLSLog                $STATE/srv2/tls.log
EOF
}

write_vsftpd_conf() {
  local dir=$1
  cat >"$dir/vsftpd.conf" <<EOF
# written by tests/lab/lab.sh start-servers
listen=NO
listen_ipv6=YES
listen_port=21
background=NO
anonymous_enable=NO
local_enable=YES
write_enable=YES
local_umask=022
chroot_local_user=YES
allow_writeable_chroot=YES
local_root=$dir/root
secure_chroot_dir=$dir/empty
pam_service_name=vsftpd
userlist_enable=NO
tcp_wrappers=NO
$(vsftpd_tls_conf)
seccomp_sandbox=NO
isolate_network=NO
pasv_enable=YES
pasv_min_port=$PASV_MIN
pasv_max_port=$PASV_MAX
pasv_promiscuous=YES
port_enable=YES
port_promiscuous=YES
connect_from_port_20=NO
max_clients=200
max_per_ip=0
idle_session_timeout=300
data_connection_timeout=120
accept_timeout=60
# a session left waiting for its data connection must not block later
# uploads of the same file name (default YES takes an fcntl write lock)
lock_upload_files=NO
# ABOR during a transfer (RFC 959 section 4.1.3): vsftpd only reads its
# control connection mid-transfer on SIGURG, i.e. when the Synch in front of
# ABOR arrives as TCP urgent data; without this it reads ABOR when the
# transfer has ended, and the classic clients (netkit, inetutils, tnftp) wait
# for that
async_abor_enable=YES
connect_timeout=60
delay_failed_login=1
xferlog_enable=YES
xferlog_std_format=NO
log_ftp_protocol=YES
vsftpd_log_file=$dir/vsftpd.log
dual_log_enable=YES
xferlog_file=$dir/xferlog
ftpd_banner=fglab srv1 vsftpd ready
EOF
  chmod 644 "$dir/vsftpd.conf"
}

write_proftpd_conf() {
  local dir=$1
  cat >"$dir/proftpd.conf" <<EOF
# written by tests/lab/lab.sh start-servers
ServerName            "fglab srv2"
ServerIdent           on "fglab srv2 ProFTPD ready"
ServerType            standalone
DefaultServer         on
DefaultAddress        198.51.100.21 2001:db8:2::21
UseIPv6               on
Port                  21
User                  nobody
Group                 nogroup
PidFile               $dir/proftpd.pid
ScoreboardFile        $dir/proftpd.scoreboard
SystemLog             $dir/proftpd.log
TransferLog           $dir/xferlog
ExtendedLog           $dir/commands.log ALL
WtmpLog               off
UseReverseDNS         off
DelayEngine           off
ControlsEngine        off
MaxInstances          200
AuthPAM               off
AuthOrder             mod_auth_unix.c
RequireValidShell     off
DefaultRoot           $dir/root
DefaultChdir          /
Umask                 022
AllowOverwrite        on
PassivePorts          $PASV_MIN $PASV_MAX
# FXP: accept PORT to and PASV connections from addresses other than the client
AllowForeignAddress   on
TimeoutIdle           300
TimeoutNoTransfer     300
TimeoutStalled        120
<Limit ALL>
  AllowAll
</Limit>
$(proftpd_tls_conf)
EOF
  chmod 644 "$dir/proftpd.conf"
}

# pure-ftpd's own user database: the lab user as a virtual user with the
# lab user's uid and gid, chrooted into the server root (the "/./" of
# pure-pw -d). The line is written here rather than by `pure-pw useradd`,
# whose argon2id hash (t=511) costs seconds of CPU at every login on a
# loaded machine; pure-ftpd also takes the system's crypt(3) hashes.
write_pureftpd_users() {
  local dir=$1 pureftpd_root=$2 hash
  rm -f "$dir/pureftpd.passwd" "$dir/pureftpd.pdb"
  if command -v openssl >/dev/null; then
    hash=$(openssl passwd -6 -salt fglab "$FTP_PASS")
  else
    hash=$("$PYTHON" -W ignore -c 'import crypt, sys; print(crypt.crypt(sys.argv[1], "$6$fglab"))' "$FTP_PASS")
  fi
  printf '%s:%s:%s:%s::%s/./::::::::::::\n' "$FTP_USER" "$hash" "$(id -u "$FTP_USER")" \
    "$(id -g "$FTP_USER")" "$dir/root" >"$dir/pureftpd.passwd"
  "$pureftpd_root/usr/bin/pure-pw" mkdb "$dir/pureftpd.pdb" -f "$dir/pureftpd.passwd" \
    >"$dir/pure-pw.log" 2>&1 || { cat "$dir/pure-pw.log" >&2; die "pure-pw mkdb failed"; }
}

cmd_start_servers() {
  need_root
  require_up
  local proftpd pureftpd_root dir
  cmd_stop_servers
  command -v vsftpd >/dev/null || die "vsftpd missing: run scripts/install-test-deps"
  proftpd=$(find_proftpd)
  pureftpd_root=$(find_pureftpd_root)
  ensure_user
  if [ "${FG_TLS:-0}" = 1 ]; then make_certs; fi

  # srv1: vsftpd
  dir=$STATE/srv1
  mkdir -p "$dir/empty"
  chmod 755 "$dir" "$dir/empty"
  prepare_root "$dir/root"
  write_vsftpd_conf "$dir"
  log "starting vsftpd in ${P}srv1 (config $dir/vsftpd.conf)"
  start_daemon "${P}srv1" "$dir/vsftpd.pid" "$dir/vsftpd.stderr" "$(command -v vsftpd)" "$dir/vsftpd.conf"
  if [ "${FG_TLS:-0}" = 1 ]; then
    # implicit FTPS (TLS from the first byte) on port 990, same root
    sed -e 's/^listen_port=21$/listen_port=990/' -e 's/^ssl_enable=YES$/ssl_enable=YES\nimplicit_ssl=YES/' \
      -e "s|^vsftpd_log_file=.*|vsftpd_log_file=$dir/vsftpd990.log|" "$dir/vsftpd.conf" >"$dir/vsftpd990.conf"
    start_daemon "${P}srv1" "$dir/vsftpd990.pid" "$dir/vsftpd990.stderr" "$(command -v vsftpd)" "$dir/vsftpd990.conf"
  fi

  # srv2: proftpd
  dir=$STATE/srv2
  mkdir -p "$dir"
  chmod 755 "$dir"
  prepare_root "$dir/root"
  write_proftpd_conf "$dir"
  "$proftpd" -t -c "$dir/proftpd.conf" >"$dir/configtest.log" 2>&1 ||
    { cat "$dir/configtest.log" >&2; die "proftpd config test failed"; }
  log "starting proftpd in ${P}srv2 (config $dir/proftpd.conf)"
  start_daemon "${P}srv2" "$dir/proftpd.run.pid" "$dir/proftpd.stderr" "$proftpd" -n -c "$dir/proftpd.conf"

  # srv3: pure-ftpd, in the foreground (no -B), flags as in pure-ftpd(8):
  #   -l puredb:FILE  its own user database (write_pureftpd_users)
  #   -E              authenticated users only, no anonymous login
  #   -A              chroot everyone (into the server root)
  #   -p MIN:MAX      passive ports; -c caps clients at half the range anyway
  #   -w              FXP for authenticated users: PORT to and PASV
  #                   connections from hosts other than the client
  #   -H              no reverse DNS; -d -d: every command and reply logged
  #   -g, -O xferlog: pid file and transfer log in the state dir
  dir=$STATE/srv3
  mkdir -p "$dir"
  chmod 755 "$dir"
  prepare_root "$dir/root"
  write_pureftpd_users "$dir" "$pureftpd_root"
  : >"$dir/syslog.log"
  log "starting the syslog receiver for pure-ftpd in ${P}srv3 (log $dir/syslog.log)"
  start_daemon "${P}srv3" "$dir/syslog.pid" "$dir/syslog.stderr" \
    "$PYTHON" "$HERE/syslog.py" --socket "$dir/log.sock" --log "$dir/syslog.log"
  wait_file "$dir/log.sock" "the syslog receiver"
  # It logs only through syslog(3): with-devlog.sh gives it a /dev/log of
  # its own in the mount namespace `ip netns exec` makes.
  log "starting pure-ftpd in ${P}srv3 (commands and replies in $dir/syslog.log)"
  start_daemon "${P}srv3" "$dir/pure-ftpd.run.pid" "$dir/pure-ftpd.stderr" \
    "$HERE/with-devlog.sh" "$dir/log.sock" \
    "$pureftpd_root/usr/sbin/pure-ftpd" -l "puredb:$dir/pureftpd.pdb" -E -A \
    -p "$PASV_MIN:$PASV_MAX" -w -H -d -d -I 5 -g "$dir/pure-ftpd.pid" \
    -O "xferlog:$dir/xferlog"

  # out3: connection recorder
  dir=$STATE/out3
  mkdir -p "$dir"
  : >"$dir/connections.log"
  log "starting connection recorder in ${P}out3 on port $OUT3_PORT (log $dir/connections.log)"
  start_daemon "${P}out3" "$dir/listener.pid" "$dir/listener.stderr" \
    "$PYTHON" "$HERE/listener.py" --port "$OUT3_PORT" --log "$dir/connections.log"

  wait_listen "${P}srv1" 21 vsftpd
  if [ "${FG_TLS:-0}" = 1 ]; then wait_listen "${P}srv1" 990 "vsftpd (implicit FTPS)"; fi
  wait_listen "${P}srv2" 21 proftpd
  wait_listen "${P}srv3" 21 pure-ftpd
  wait_listen "${P}out3" "$OUT3_PORT" listener
  wait_banner "$NS_GW" 198.51.100.20
  wait_banner "$NS_GW" 2001:db8:2::20
  wait_banner "$NS_GW" 198.51.100.21
  wait_banner "$NS_GW" 2001:db8:2::21
  wait_banner "$NS_GW" 198.51.100.22
  wait_banner "$NS_GW" 2001:db8:2::22
  # the probes above are not bounce evidence
  : >"$STATE/out3/connections.log"
  log "servers running: vsftpd pid $(cat "$STATE/srv1/vsftpd.pid"), proftpd pid $(cat "$STATE/srv2/proftpd.run.pid"), pure-ftpd pid $(cat "$STATE/srv3/pure-ftpd.run.pid"), recorder pid $(cat "$STATE/out3/listener.pid")"
}

cmd_stop_servers() {
  need_root
  local name
  # every process in the server namespaces: the daemons and their per-session
  # children (nothing else is meant to run there)
  for name in srv1 srv2 srv3 out3; do
    kill_ns_procs "$P$name"
  done
  rm -f "$STATE/srv1/vsftpd.pid" "$STATE/srv1/vsftpd990.pid" "$STATE/srv2/proftpd.run.pid" "$STATE/srv2/proftpd.pid" \
    "$STATE/srv3/pure-ftpd.run.pid" "$STATE/srv3/pure-ftpd.pid" "$STATE/srv3/syslog.pid" \
    "$STATE/out3/listener.pid" 2>/dev/null || true
}

cmd_forward() {
  need_root
  ns_exists "$NS_GW" || die "namespace $NS_GW missing: run '$0 up' first"
  case "${1:-status}" in
    allow)
      log "gw forward policy -> accept (proxy-less checks only)"
      nsx "$NS_GW" nft add chain inet fglab forward '{ type filter hook forward priority filter; policy accept; }'
      ;;
    drop)
      log "gw forward policy -> drop"
      nsx "$NS_GW" nft add chain inet fglab forward '{ type filter hook forward priority filter; policy drop; }'
      ;;
    status)
      nsx "$NS_GW" nft list chain inet fglab forward
      ;;
    *) die "usage: $0 forward allow|drop|status" ;;
  esac
}

cmd_status() {
  local ns f pid
  for ns in $(all_ns); do
    if ns_exists "$ns"; then
      echo "$ns: $(ip -n "$ns" -br addr show | awk '$1!="lo"{$2=""; print}' | tr -s ' ' | tr '\n' ';')"
    else
      echo "$ns: absent"
    fi
  done
  for f in srv1/vsftpd.pid srv2/proftpd.run.pid srv3/pure-ftpd.run.pid srv3/syslog.pid out3/listener.pid; do
    if [ -f "$STATE/$f" ] && pid=$(cat "$STATE/$f") && kill -0 "$pid" 2>/dev/null; then
      echo "$f: running (pid $pid)"
    else
      echo "$f: not running"
    fi
  done
}

cmd_exec() {
  [ $# -ge 2 ] || die "usage: $0 exec NS CMD..."
  local ns
  ns=$(ns_name "$1"); shift
  ns_exists "$ns" || die "no namespace $ns"
  exec ip netns exec "$ns" "$@"
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  start-servers) cmd_start_servers ;;
  stop-servers) cmd_stop_servers ;;
  exec) shift; cmd_exec "$@" ;;
  forward) shift; cmd_forward "$@" ;;
  status) cmd_status ;;
  env) cat "$STATE/lab.env" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
