#!/bin/bash
# Networking: net=user (QEMU, no root) reaches the host's loopback as 10.0.2.2;
# net=tap (root; QEMU or Firecracker) gets its own /30 with NAT to the host's uplink.
set -euo pipefail
B=${BANDSOX_MNT:-/mnt/bandsox}
dir=$(mktemp -d); echo "hello from the host" > "$dir/hello.txt"
python3 -m http.server --bind 127.0.0.1 --directory "$dir" 8931 >/dev/null 2>&1 &
srv=$!; trap 'kill $srv; rm -rf "$dir"' EXIT
sleep 1
echo "create netdemo net=user backend=qemu" > "$B/ctl"
grep '"ip"' "$B/netdemo/info"                               # "ip": "10.0.2.15"
echo 'timeout 30 wget -q -O - http://10.0.2.2:8931/hello.txt' > "$B/netdemo/exec"
cat "$B/netdemo/exec"                                       # hello from the host
rmdir "$B/netdemo"
if [ "$(id -u)" = 0 ]; then
  echo "create tapdemo net=tap" > "$B/ctl"
  grep '"ip"' "$B/tapdemo/info"                             # "ip": "172.30.0.2" (or the next free /30)
  echo 'ip route' > "$B/tapdemo/exec"; cat "$B/tapdemo/exec"  # default via 172.30.0.1
  rmdir "$B/tapdemo"                                        # its TAP device is gone too
fi
