#!/bin/bash
# net=tap (root): a second daemon runs in a network namespace the test creates ("d"), with
# a veth link to another namespace ("up") that plays the outside world and has no route
# back to the VMs' addresses. So a guest can only fetch from "up" if the daemon's NAT
# works. Checks: per-VM /30 addresses, fetch through NAT, VM-to-VM isolation, clones of a
# snapshot each on their own TAP device and address, the TAP device follows
# stop/start/rmdir, and nothing is left in the namespace afterwards.
# (busybox-static wget crashes with -T, so `timeout` bounds the fetches.)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
command -v nft >/dev/null || fail "nft missing (mount-helpers/setup installs nftables)"
ns_d=bsxt-d-$$ ns_up=bsxt-up-$$
M2=$(mktemp -d /var/tmp/bandsox-tap.XXXXXX)
srv=$M2/www
mkdir -p "$M2/mnt" "$M2/state/images" "$srv"
cp -a --reflink=auto "$STATE/boot" "$M2/state/"
cp -a --reflink=auto --sparse=always "$STATE/images/base" "$M2/state/images/"
echo "hello through NAT" > "$srv/hello.txt"
# Only the network namespace is entered, so /sys still shows the host's devices: ask `ip`.
in_d() { nsenter --net="/run/netns/$ns_d" "$@"; }
has_link() { in_d ip link show dev "$1" >/dev/null 2>&1; }

finish() {
  set +e
  for v in t1 t2 c-1 c-2; do [ -d "$M2/mnt/$v" ] && rmdir "$M2/mnt/$v"; done
  "$BANDSOX" unmount "$M2/mnt" >/dev/null 2>&1
  for p in "$M2"/state/vms/*/vmm.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null; done
  [ -n "${http_pid:-}" ] && kill "$http_pid" 2>/dev/null
  pkill -f "bandsox mount $M2/mnt" 2>/dev/null
  ip netns del "$ns_d" 2>/dev/null; ip netns del "$ns_up" 2>/dev/null
  rm -rf "$M2"
}
on_exit finish

ip netns add "$ns_d"; ip netns add "$ns_up"
ip link add tvd$$ netns "$ns_d" type veth peer name tvu$$ netns "$ns_up"
ip -n "$ns_d" addr add 10.99.0.1/24 dev tvd$$
ip -n "$ns_up" addr add 10.99.0.2/24 dev tvu$$
for n in "$ns_d" "$ns_up"; do ip -n "$n" link set lo up; done
ip -n "$ns_d" link set tvd$$ up; ip -n "$ns_up" link set tvu$$ up
ip netns exec "$ns_up" python3 -m http.server --bind 10.99.0.2 --directory "$srv" 8080 \
  >"$M2/http.log" 2>&1 &
http_pid=$!

# The daemon only enters the network namespace: its FUSE mount is visible to us.
in_d env BANDSOX_LOG=info "$BANDSOX" mount "$M2/mnt" --state-dir "$M2/state" \
  || fail "daemon in netns did not start"
wait_for 10 test -f "$M2/mnt/ctl" || fail "no ctl in the netns daemon's mount"

echo "create t1 net=tap backend=${BACKEND:-qemu}" > "$M2/mnt/ctl" || fail "create t1: $(cat "$M2/mnt/ctl")"
echo "create t2 net=tap backend=${BACKEND:-qemu}" > "$M2/mnt/ctl" || fail "create t2: $(cat "$M2/mnt/ctl")"
id1=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$M2/mnt/t1/info")
assert_contains "$(cat "$M2/mnt/t1/info")" '"ip": "172.30.0.2"' "t1 info"
assert_contains "$(cat "$M2/mnt/t2/info")" '"ip": "172.30.0.6"' "t2 info"
in_d ip -4 addr show dev "bsx$id1" | has "inet 172.30.0.1/30" || fail "t1's TAP device has no host address"
in_d nft list table ip bandsox | has masquerade || fail "no NAT rule"
[ "$(in_d cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || fail "forwarding is off"

echo 'timeout 30 wget -q -O - http://10.99.0.2:8080/hello.txt' > "$M2/mnt/t1/exec"
assert_eq "hello through NAT" "$(cat "$M2/mnt/t1/exec")" "fetch through NAT"
grep -q '^10.99.0.1 ' "$M2/http.log" || fail "server did not see the NAT address: $(cat "$M2/http.log")"
echo 'ping -c1 -W3 172.30.0.1 >/dev/null && echo host-ok' > "$M2/mnt/t1/exec"
assert_eq host-ok "$(cat "$M2/mnt/t1/exec")" "guest reaches its host side"
echo 'ping -c1 -W3 172.30.0.5 >/dev/null && echo host-ok' > "$M2/mnt/t2/exec"
assert_eq host-ok "$(cat "$M2/mnt/t2/exec")" "t2 reaches its host side"
echo 'ping -c1 -W2 172.30.0.6 >/dev/null && echo reached || echo isolated' > "$M2/mnt/t1/exec"
assert_eq isolated "$(cat "$M2/mnt/t1/exec")" "t1 -> t2 must be dropped"

# Clones of a net=tap VM: each has its own TAP device and /30; the agent re-addresses the
# restored guest, which otherwise would still carry t1's address.
echo 'echo from-t1 > /root/mark' > "$M2/mnt/t1/exec"; cat "$M2/mnt/t1/exec" >/dev/null
echo 'snapshot s1' > "$M2/mnt/t1/ctl" || fail "snapshot: $(cat "$M2/mnt/t1/ctl")"
echo 'clone s1 c count=2' > "$M2/mnt/ctl" || fail "clone: $(cat "$M2/mnt/ctl")"
seen=""
for c in c-1 c-2; do
  ip=$(sed -n 's/.*"ip": "\([0-9.]*\)".*/\1/p' "$M2/mnt/$c/info")
  case " 172.30.0.2 172.30.0.6 $seen " in *" $ip "*) fail "$c got a taken address [$ip]";; esac
  seen="$seen $ip"
  cid=$(sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p' "$M2/mnt/$c/info")
  has_link "bsx$cid" || fail "$c has no TAP device"
  gw=${ip%.*}.$(( ${ip##*.} - 1 ))
  echo 'cat /root/mark; ip -4 -o addr show | grep -v " lo " | grep -o "inet [0-9./]*"; ip route | grep "^default"' > "$M2/mnt/$c/exec"
  out=$(cat "$M2/mnt/$c/exec")
  assert_contains "$out" "from-t1" "$c restored from t1"
  assert_contains "$out" "inet $ip/30" "$c's guest address"
  assert_contains "$out" "default via $gw" "$c's default route"
  echo 'timeout 30 wget -q -O - http://10.99.0.2:8080/hello.txt' > "$M2/mnt/$c/exec"
  assert_eq "hello through NAT" "$(cat "$M2/mnt/$c/exec")" "$c fetches through NAT"
  echo 'ping -c1 -W2 172.30.0.2 >/dev/null && echo reached || echo isolated' > "$M2/mnt/$c/exec"
  assert_eq isolated "$(cat "$M2/mnt/$c/exec")" "$c -> t1 must be dropped"
done
echo 'timeout 30 wget -q -O - http://10.99.0.2:8080/hello.txt' > "$M2/mnt/t1/exec"
assert_eq "hello through NAT" "$(cat "$M2/mnt/t1/exec")" "the source still fetches after its clones"
rmdir "$M2/mnt/c-1" "$M2/mnt/c-2"
left=$(in_d ip -o link show | grep -o ': bsx[0-9a-f]\{12\}' | sort | tr -d ': \n' || true)
[ "$(echo "$left" | grep -o bsx | wc -l)" = 2 ] || fail "clone TAP devices left after rmdir: $left"
note "clones on their own TAP devices:$seen"

# The TAP device lives as long as the VMM.
echo stop > "$M2/mnt/t1/ctl"
! has_link "bsx$id1" || fail "TAP device left after stop"
echo start > "$M2/mnt/t1/ctl"
has_link "bsx$id1" || fail "no TAP device after start"
echo 'timeout 30 wget -q -O - http://10.99.0.2:8080/hello.txt' > "$M2/mnt/t1/exec"
assert_eq "hello through NAT" "$(cat "$M2/mnt/t1/exec")" "fetch after stop/start"
rmdir "$M2/mnt/t1" "$M2/mnt/t2"
left=$(in_d ip -o link show | grep -o ': bsx[0-9a-f]\{12\}' || true)
[ -z "$left" ] || fail "TAP devices left after rmdir: $left"
# A freed address is handed out again.
echo "create t1 net=tap backend=${BACKEND:-qemu}" > "$M2/mnt/ctl" || fail "re-create t1: $(cat "$M2/mnt/ctl")"
assert_contains "$(cat "$M2/mnt/t1/info")" '"ip": "172.30.0.2"' "re-created t1 info"
