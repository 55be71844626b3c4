#!/bin/bash
# net=user (QEMU slirp, no root needed): the guest is 10.0.2.15, reaches the host's
# loopback as 10.0.2.2, and fetches a file from an HTTP server the test runs there.
# net=none: no interface but lo.
# (busybox-static wget crashes with -T, so `timeout` bounds the fetches.)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
srv=$(mktemp -d /var/tmp/bandsox-http.XXXXXX)
head -c 300000 /dev/urandom > "$srv/blob.bin"
echo "hello from the host" > "$srv/hello.txt"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$srv" "$port" >"$srv.log" 2>&1 &
http_pid=$!
finish() { kill "$http_pid" 2>/dev/null || true; rm -rf "$srv" "$srv.log"; cleanup_vms; }
on_exit finish
wait_for 10 python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/hello.txt')" \
  || fail "test HTTP server did not start"

echo "create nu net=user backend=qemu" > "$MNT/ctl" || fail "create net=user: $(cat "$MNT/ctl")"
VMS="nu"
assert_contains "$(cat "$MNT/nu/info")" '"ip": "10.0.2.15"' "info of a net=user VM"
assert_contains "$(cat "$MNT/nu/info")" '"net": "user"' "info of a net=user VM"

echo "timeout 30 wget -q -O - http://10.0.2.2:$port/hello.txt" > "$MNT/nu/exec"
assert_eq "hello from the host" "$(cat "$MNT/nu/exec")" "file fetched by the guest"
echo "timeout 60 wget -q -O /tmp/blob.bin http://10.0.2.2:$port/blob.bin && sha256sum /tmp/blob.bin" > "$MNT/nu/exec"
want=$(sha256sum "$srv/blob.bin" | cut -d' ' -f1)
assert_eq "$want" "$(cut -d' ' -f1 < "$MNT/nu/exec")" "300 KB download checksum"
echo 'ip -4 addr show dev eth0 | grep -o "inet [0-9./]*"; ip route | grep default' > "$MNT/nu/exec"
out=$(cat "$MNT/nu/exec")
assert_contains "$out" "inet 10.0.2.15/24" "guest address"
assert_contains "$out" "default via 10.0.2.2" "guest default route"
assert_contains "$(cat "$MNT/nu/fs/etc/resolv.conf")" "nameserver 10.0.2.3" "guest resolv.conf"

# The network survives a stop/start (the kernel command line is rebuilt).
echo stop > "$MNT/nu/ctl"
echo start > "$MNT/nu/ctl"
echo "timeout 30 wget -q -O - http://10.0.2.2:$port/hello.txt" > "$MNT/nu/exec"
assert_eq "hello from the host" "$(cat "$MNT/nu/exec")" "fetch after stop/start"

# net=none: only lo, and it is up.
mkdir "$MNT/nn" || fail "mkdir nn: $(cat "$MNT/nn/state" 2>/dev/null)"
VMS="nu nn"
echo 'ls /sys/class/net; cat /sys/class/net/lo/operstate; ping -c1 -W2 127.0.0.1 >/dev/null && echo lo-ok' > "$MNT/nn/exec"
out=$(cat "$MNT/nn/exec")
assert_eq "lo
unknown
lo-ok" "$out" "net=none interfaces"
assert_contains "$(cat "$MNT/nn/info")" '"ip": null' "info of a net=none VM"
