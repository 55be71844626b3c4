#!/bin/bash
# Soak: N sequential `exec`s (a write-only `true`, as `echo true > exec` does) on one VM;
# prints the per-exec latency of the first and the last 100 (and 200), and the daemon's
# RSS and open descriptors before and after, so a slowdown or a leak shows. Not a test:
# prints numbers (docs/benchmarks.md). The peer in the same run is the raw protocol ping
# over the VM's connection (`ping N` on its ctl), before and after the soak.
# Usage: bench/exec-soak.sh [N]   (root; after mount-helpers/setup --no-mount)
set -euo pipefail
n=${1:-1000}
work=/var/tmp/bandsox-bench-soak
. "$(dirname "$0")/lib.sh"
bench_mount
mkdir "$MNT/soak"
daemon=$(pgrep -f "bandsox mount $MNT" | head -n1)
vmm=$(cat "$STATE"/vms/*/vmm.pid)
usage() {
  echo "daemon rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$daemon/status") fds=$(ls "/proc/$daemon/fd" | wc -l)" \
       "vmm rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$vmm/status")"
}
ping() { echo 'ping 200' > "$MNT/soak/ctl"; sed -n 's/.*median_us=\([0-9]*\).*/\1/p' "$MNT/soak/ctl"; }
echo 'true' > "$MNT/soak/exec"   # warm up
echo "before: $(usage); ping median $(ping) us"
perl -MTime::HiRes=time -e '
  my ($n, $f) = @ARGV;
  for my $i (1 .. $n) {
    my $t0 = time;
    open(my $fh, ">", $f) or die "open: $!";
    syswrite($fh, "true\n") or die "write: $!";
    close($fh) or die "close: $!";
    printf "%d\n", (time - $t0) * 1e6;
  }' "$n" "$MNT/soak/exec" > "$work/soak.us"
echo "after:  $(usage); ping median $(ping) us"
stats() { sort -n | awk '{a[NR]=$1; s+=$1} END {printf "median %d us, mean %d us, p90 %d us", a[int((NR+1)/2)], s/NR, a[int(NR*0.9)]}'; }
echo "execs 1-100:      $(head -n 100 "$work/soak.us" | stats)"
echo "execs $((n-99))-$n: $(tail -n 100 "$work/soak.us" | stats)"
echo "execs 1-200:      $(head -n 200 "$work/soak.us" | stats)"
echo "execs $((n-199))-$n: $(tail -n 200 "$work/soak.us" | stats)"
f=$(head -n 200 "$work/soak.us" | awk '{s+=$1} END {print s/NR}')
l=$(tail -n 200 "$work/soak.us" | awk '{s+=$1} END {print s/NR}')
echo "last 200 / first 200 (mean): $(awk -v a="$l" -v b="$f" 'BEGIN{printf "%.3f", a/b}')"
kept=0; for r in "$MNT"/soak/runs/[0-9]*; do [ -e "$r" ] && kept=$((kept + 1)); done
echo "runs kept: $kept"
rmdir "$MNT/soak"
