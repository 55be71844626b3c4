#!/bin/bash
# 64 MiB of random bytes through exec hash identically; daemon memory stays bounded.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
new_vm big
dpid=$(daemon_pid)
rss0=$(awk '/VmRSS/{print $2}' "/proc/$dpid/status")
exec 3<>"$MNT/big/exec"
echo 'head -c 67108864 /dev/urandom > /tmp/blob; cat /tmp/blob' >&3
host=$(cat <&3 | md5sum | cut -d' ' -f1)
exec 3<&-
n=$(readlink "$MNT/big/runs/last")
echo 'md5sum < /tmp/blob' > "$MNT/big/exec"
guest=$(cut -d' ' -f1 < "$MNT/big/runs/last/stdout")
assert_eq "$guest" "$host" "md5 of 64 MiB streamed through exec"
assert_eq "$guest" "$(md5sum < "$MNT/big/runs/$n/stdout" | cut -d' ' -f1)" "md5 of runs/$n/stdout"
assert_eq 67108864 "$(stat -c %s "$MNT/big/runs/$n/stdout")" "stdout size"
rss1=$(awk '/VmRSS/{print $2}' "/proc/$dpid/status")
note "daemon RSS ${rss0} kB -> ${rss1} kB"
[ "$rss1" -lt $((rss0 + 65536)) ] || fail "daemon RSS grew by $((rss1 - rss0)) kB while streaming 64 MiB"
