#!/usr/bin/env bash
# Proxy-less self-test of the lab: proves the topology, the three FTP servers and
# the helper scripts work, and that without a proxy nothing crosses the gateway.
#
#   tests/lab/selftest.sh
#
# Builds the lab (lab.sh up + start-servers), then:
#   - final topology (forward policy drop): direct FTP from in1 to the servers
#     fails fast; bridged neighbours still reach each other; nothing listens
#     on port 21 in the root namespace
#   - with forwarding temporarily allowed: curl EPSV/PASV/EPRT/PORT downloads
#     (IPv4 and IPv6), uploads, lftp get/put, fxp.py in both directions (PASV
#     and --epsv), race.py (victim alone, and a theft that succeeds because no
#     proxy protects the servers), the out3 connection recorder
#   - forwarding back to drop, then lab.sh down (FG_KEEP_LAB=1 keeps it up)
# Ends with "N passed, M failed"; exit status 1 when anything failed.
# Honours FG_PREFIX / FG_STATE like lab.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
L=$HERE/lab.sh
PASSED=0
FAILED=0

ok() { echo "PASS $*"; PASSED=$((PASSED + 1)); }
bad() { echo "FAIL $*"; FAILED=$((FAILED + 1)); }
check() {
  local desc=$1; shift
  if "$@"; then ok "$desc"; else bad "$desc"; fi
}
x() { "$L" exec "$@"; }

"$L" up
"$L" start-servers
eval "$("$L" env | grep -E '^[A-Z0-9_]+=')"
T=$FG_STATE/selftest
mkdir -p "$T"

SHA1=$(cut -d' ' -f1 "$SRV1_ROOT/data.bin.sha256")
SHA2=$(cut -d' ' -f1 "$SRV2_ROOT/data.bin.sha256")
SHA3=$(cut -d' ' -f1 "$SRV3_ROOT/data.bin.sha256")
# srv_addrs N: a4, a6 and want (data.bin's sha256) of server N
srv_addrs() {
  case $1 in
    1) a4=$SRV1_4 a6=$SRV1_6 want=$SHA1 ;;
    2) a4=$SRV2_4 a6=$SRV2_6 want=$SHA2 ;;
    3) a4=$SRV3_4 a6=$SRV3_6 want=$SHA3 ;;
  esac
}
sha_of() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }

cleanup() {
  "$L" forward drop >/dev/null 2>&1 || true
}
trap cleanup EXIT

CURL=(curl -sS --connect-timeout 3 --max-time 30)

# --- final topology: nothing is forwarded ------------------------------------
echo "== final topology (forward policy drop)"
root_ns_port21() { ! ss -Hltn 'sport = :21' | grep -q .; }
check "nothing listens on port 21 in the root namespace" root_ns_port21

direct_blocked() {
  local url=$1 start end rc=0
  start=$(date +%s)
  x in1 "${CURL[@]}" -o /dev/null "$url" 2>/dev/null || rc=$?
  end=$(date +%s)
  echo "   curl $url -> exit $rc after $((end - start))s"
  [ "$rc" != 0 ] && [ $((end - start)) -le 6 ]
}
check "direct IPv4 download in1 -> srv1 fails fast" direct_blocked "ftp://ftptest:ftptest@$SRV1_4/data.bin"
check "direct IPv6 download in1 -> srv2 fails fast" direct_blocked "ftp://ftptest:ftptest@[$SRV2_6]/data.bin"

bridged() { x "$1" ping -q -c 1 -W 2 "$2" >/dev/null; }
check "in1 reaches in2 over br-in (IPv4)" bridged in1 "$IN2_4"
check "in1 reaches in2 over br-in (IPv6)" bridged in1 "$IN2_6"
check "srv2 reaches srv1 over br-out (IPv4)" bridged srv2 "$SRV1_4"
check "srv1 reaches srv2 over br-out (IPv6)" bridged srv1 "$SRV2_6"
check "gateway reaches srv1:21" x gw "${CURL[@]}" -o /dev/null "ftp://ftptest:ftptest@$SRV1_4/"

# --- proxy-less transfers with forwarding allowed ----------------------------
echo "== forwarding temporarily allowed"
"$L" forward allow

download() {
  local url=$1 want=$2 out=$T/dl.bin
  shift 2
  rm -f "$out"
  x in1 "${CURL[@]}" "$@" -o "$out" "$url" || return 1
  [ "$(sha_of "$out")" = "$want" ]
}
for srv in 1 2 3; do
  srv_addrs $srv
  u4="ftp://ftptest:ftptest@$a4/data.bin"
  u6="ftp://ftptest:ftptest@[$a6]/data.bin"
  check "srv$srv curl EPSV download, sha256 matches" download "$u4" "$want"
  check "srv$srv curl PASV (--disable-epsv) download" download "$u4" "$want" --disable-epsv
  check "srv$srv curl EPRT (-P -) download" download "$u4" "$want" -P -
  check "srv$srv curl PORT (-P - --disable-eprt) download" download "$u4" "$want" -P - --disable-eprt
  check "srv$srv curl IPv6 EPSV download" download "$u6" "$want" -g
  check "srv$srv curl IPv6 EPRT (-P -) download" download "$u6" "$want" -g -P -
done

head -c 1048576 /dev/urandom >"$T/up.bin"
UPSHA=$(sha_of "$T/up.bin")
upload() {
  local srv=$1 url=$2 name=$3 root
  shift 3
  root=$FG_STATE/srv$srv/root
  x in1 "${CURL[@]}" "$@" -T "$T/up.bin" "$url$name" || return 1
  [ "$(sha_of "$root/$name")" = "$UPSHA" ]
}
for srv in 1 2 3; do
  srv_addrs $srv
  check "srv$srv curl upload (EPSV)" upload $srv "ftp://ftptest:ftptest@$a4/" up-epsv.bin
  check "srv$srv curl upload (PORT)" upload $srv "ftp://ftptest:ftptest@$a4/" up-port.bin -P - --disable-eprt
  check "srv$srv curl IPv6 upload" upload $srv "ftp://ftptest:ftptest@[$a6]/" up-v6.bin -g
done

LFTP_SET="set net:timeout 5; set net:max-retries 1; set net:reconnect-interval-base 1; set ftp:ssl-allow no; set cmd:fail-exit yes"
lftp_get() {
  local host=$1 want=$2 passive=$3 out=$T/lftp.bin
  rm -f "$out"
  x in1 timeout 30 lftp -c "$LFTP_SET; set ftp:passive-mode $passive; open -u ftptest,ftptest ftp://$host; get data.bin -o $out" || return 1
  [ "$(sha_of "$out")" = "$want" ]
}
lftp_put() {
  local srv=$1 host=$2 root=$FG_STATE/srv$1/root
  x in1 timeout 30 lftp -c "$LFTP_SET; open -u ftptest,ftptest ftp://$host; put $T/up.bin -o up-lftp.bin" || return 1
  [ "$(sha_of "$root/up-lftp.bin")" = "$UPSHA" ]
}
check "srv1 lftp passive get" lftp_get "$SRV1_4" "$SHA1" on
check "srv1 lftp active get" lftp_get "$SRV1_4" "$SHA1" off
check "srv1 lftp IPv6 get" lftp_get "[$SRV1_6]" "$SHA1" on
check "srv1 lftp put" lftp_put 1 "$SRV1_4"
check "srv2 lftp passive get" lftp_get "$SRV2_4" "$SHA2" on
check "srv2 lftp active get" lftp_get "$SRV2_4" "$SHA2" off
check "srv2 lftp IPv6 get" lftp_get "[$SRV2_6]" "$SHA2" on
check "srv2 lftp put" lftp_put 2 "$SRV2_4"
check "srv3 lftp passive get" lftp_get "$SRV3_4" "$SHA3" on
check "srv3 lftp active get" lftp_get "$SRV3_4" "$SHA3" off
check "srv3 lftp IPv6 get" lftp_get "[$SRV3_6]" "$SHA3" on
check "srv3 lftp put" lftp_put 3 "$SRV3_4"

fxp() {
  local src=$1 dst=$2 dstroot=$3 name=$4 want=$5
  shift 5
  x in1 "$HERE/fxp.py" "$@" "$src" "$dst" data.bin "$name" >"$T/fxp.out" 2>&1 || { cat "$T/fxp.out"; return 1; }
  tail -n 1 "$T/fxp.out" | sed 's/^/   /'
  [ "$(sha_of "$dstroot/$name")" = "$want" ]
}
check "fxp.py srv1 -> srv2 (PASV/PORT)" fxp "$SRV1_4" "$SRV2_4" "$SRV2_ROOT" fxp-from-srv1.bin "$SHA1"
check "fxp.py srv2 -> srv1 (PASV/PORT)" fxp "$SRV2_4" "$SRV1_4" "$SRV1_ROOT" fxp-from-srv2.bin "$SHA2"
check "fxp.py srv1 -> srv2 IPv6 (--epsv)" fxp "$SRV1_6" "$SRV2_6" "$SRV2_ROOT" fxp6-from-srv1.bin "$SHA1" --epsv
check "fxp.py srv2 -> srv1 IPv6 (--epsv)" fxp "$SRV2_6" "$SRV1_6" "$SRV1_ROOT" fxp6-from-srv2.bin "$SHA2" --epsv
check "fxp.py srv1 -> srv3 (PASV/PORT)" fxp "$SRV1_4" "$SRV3_4" "$SRV3_ROOT" fxp-from-srv1.bin "$SHA1"
check "fxp.py srv3 -> srv1 (PASV/PORT)" fxp "$SRV3_4" "$SRV1_4" "$SRV1_ROOT" fxp-from-srv3.bin "$SHA3"
fxp_refused() {
  local rc=0
  x in1 "$HERE/fxp.py" "$SRV1_4" "$SRV2_4" no-such-file.bin never.bin >"$T/fxp.out" 2>&1 || rc=$?
  tail -n 1 "$T/fxp.out" | sed 's/^/   /'
  [ "$rc" = 2 ] && tail -n 1 "$T/fxp.out" | grep -q '^RESULT refused'
}
check "fxp.py reports a refusal with exit 2" fxp_refused

# race.py: victim alone gets the file; an attacker on in2 that connects first
# steals it (no proxy: the servers accept foreign data peers for FXP)
race() {
  local host=$1 want=$2 attack=$3 sig=$T/race.sig vp h p rc=0
  rm -f "$sig" "$T/victim.out" "$T/steal.out" "$T/steal.out.status"
  x in1 "$HERE/race.py" pasv "$host" "$sig" >"$T/victim.out" 2>&1 &
  vp=$!
  for _ in $(seq 1 100); do grep -q '^PASV ' "$T/victim.out" 2>/dev/null && break; sleep 0.1; done
  read -r _ h p < <(grep '^PASV ' "$T/victim.out") || { cat "$T/victim.out"; kill "$vp" 2>/dev/null; return 1; }
  if [ "$attack" = yes ]; then
    x in2 "$HERE/race.py" steal "$h" "$p" "$T/steal.out" >/dev/null 2>&1 &
    # the victim goes on once the attacker holds the data connection (a
    # fixed sleep loses the race on a loaded machine)
    for _ in $(seq 1 100); do
      x in2 ss -Htn state established "( dport = :$p )" | grep -q . && break
      sleep 0.1
    done
  fi
  touch "$sig"
  wait "$vp" || rc=$?
  [ "$attack" = yes ] && wait
  sed 's/^/   victim: /' "$T/victim.out"
  if [ "$attack" = yes ]; then
    sed 's/^/   attacker: /' "$T/steal.out.status"
    grep -q "sha256=$want" "$T/steal.out.status" && [ "$rc" != 0 ]
  else
    [ "$rc" = 0 ] && grep -q "^SHA256 $want BYTES" "$T/victim.out"
  fi
}
check "race.py victim alone gets srv1's data.bin" race "$SRV1_4" "$SHA1" no
check "race.py victim alone gets srv2's data.bin" race "$SRV2_4" "$SHA2" no
check "race.py theft detected without proxy (srv1)" race "$SRV1_4" "$SHA1" yes
check "race.py theft detected without proxy (srv2)" race "$SRV2_4" "$SHA2" yes
check "race.py victim alone gets srv3's data.bin" race "$SRV3_4" "$SHA3" no
check "race.py theft detected without proxy (srv3)" race "$SRV3_4" "$SHA3" yes

recorder() {
  : >"$OUT3_LOG"
  x in1 "$(command -v python3)" -c "import socket; s=socket.create_connection(('$OUT3_4', $OUT3_PORT), timeout=3); s.sendall(b'hello'); s.close()" || return 1
  x in2 "$(command -v python3)" -c "import socket; s=socket.create_connection(('$OUT3_6', $OUT3_PORT), timeout=3); s.close()" || return 1
  for _ in $(seq 1 30); do [ "$(grep -c close "$OUT3_LOG")" -ge 2 ] && break; sleep 0.1; done
  sed 's/^/   /' "$OUT3_LOG"
  grep -q "connect peer=$IN1_4 " "$OUT3_LOG" && grep -q "close peer=$IN1_4 .* bytes=5 first=68656c6c6f" "$OUT3_LOG" &&
    grep -q "connect peer=$IN2_6 " "$OUT3_LOG"
}
check "out3 recorder logs IPv4 and IPv6 peers" recorder
: >"$OUT3_LOG"

"$L" forward drop
check "after forward drop: direct download fails fast again" direct_blocked "ftp://ftptest:ftptest@$SRV2_4/data.bin"

if [ "${FG_KEEP_LAB:-0}" != 1 ]; then
  "$L" down
  leftovers() {
    local ns
    for ns in gw in1 in2 srv1 srv2 srv3 out3; do
      [ -e "/run/netns/$FG_PREFIX$ns" ] && return 1
    done
    ! pgrep -f "$FG_STATE/" >/dev/null
  }
  check "down leaves no namespaces and no lab processes" leftovers
fi
trap - EXIT

echo "selftest: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
