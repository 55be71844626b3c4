# 64 MiB of random bytes through exec hash identically; daemon memory stays bounded.
. "$(dirname "$0")/lib.sh"
new_vm big
dpid=$(daemon_pid)
rss0=$(awk '/VmRSS/{print $2}' /proc/$dpid/status)
exec 3<>"$MNT/big/exec"
echo 'head -c 67108864 /dev/urandom | tee /tmp/blob | md5sum >&2 >/dev/null; cat /tmp/blob' >&3
host=$(cat <&3 | md5sum | cut -d' ' -f1)
exec 3<&-
guest=$(cat "$MNT/big/runs/last/stderr" | cut -d' ' -f1)
assert_eq "$guest" "$host" "md5 of 64 MiB"
size=$(stat -c %s "$MNT/big/runs/last/stdout")
assert_eq 67108864 "$size" "stdout size"
rss1=$(awk '/VmRSS/{print $2}' /proc/$dpid/status)
note "daemon RSS ${rss0} kB -> ${rss1} kB"
[ "$rss1" -lt $((rss0 + 65536)) ] || fail "daemon RSS grew by $((rss1 - rss0)) kB while streaming 64 MiB"
